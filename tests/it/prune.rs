//! Prune against the real engine: it never removes a container whose exit is
//! not recorded, counts `min_age` from the container's exit, runs on its
//! interval and on `POST /v1/prune` (journaled in `prune_runs`), and removes
//! only images drover itself pulled, through a real registry.

use crate::support::registry::Registry;
use crate::support::*;
use drover::docker::DockerClient;
use drover::model::now_millis;
use drover::prune::{self, PruneSettings, Trigger};
use drover::store::Store;
use serde_json::{json, Value};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(90);

/// Serves HTTP, and exits with `code` once `/tmp/go` exists in the container.
fn exit_on_cue(code: u8) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("httpd -p $PORT -h /www; while [ ! -f /tmp/go ]; do sleep 0.1; done; exit {code}"),
    ]
}

fn prune_toml(interval: &str, min_age: &str, images: bool) -> String {
    format!("[prune]\ninterval = {interval:?}\nmin_age = {min_age:?}\nimages = {images}\n")
}

fn container_state(container: &str) -> Option<String> {
    try_docker(&["inspect", "-f", "{{.State.Status}}", container])
}

fn image_exists(image: &str) -> bool {
    try_docker(&["image", "inspect", image]).is_some()
}

/// The store and Docker client of the daemon's instance, opened in this process.
async fn open_instance(daemon: &Daemon) -> (Store, DockerClient) {
    let store = Store::open(&daemon.db_path()).await.expect("open store");
    let docker = DockerClient::connect(store.instance_id()).await.expect("connect docker");
    (store, docker)
}

async fn terminated_at(daemon: &Daemon, id: &str) -> i64 {
    daemon
        .query_one(&format!(
            "SELECT timestamp_ms FROM backend_events WHERE backend_id = '{id}' AND status = 'terminated'"
        ))
        .await
        .as_i64()
        .expect("terminated event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_never_removes_a_container_whose_exit_is_unrecorded() {
    let mut daemon = Daemon::start_with(DaemonConfig {
        extra_toml: prune_toml("1h", "0s", false),
        ..Default::default()
    })
    .await;
    let id = daemon.spawn_executable(json!({ "image": test_image(), "command": exit_on_cue(7) })).await;
    let ready = daemon.wait_status(&id, "ready", WITHIN).await;
    let container = ready["container_id"].as_str().unwrap().to_string();

    // drover dies; then the backend exits: nobody has recorded that exit.
    daemon.kill9();
    docker(&["exec", &container, "touch", "/tmp/go"]);
    wait_for("the container to exit", WITHIN, || async {
        container_state(&container).as_deref() == Some("exited")
    })
    .await;

    // A prune pass on the same database while drover is down, with no age limit.
    let (store, engine) = open_instance(&daemon).await;
    let settings = PruneSettings {
        min_age: Duration::ZERO,
        images: false,
    };
    let run = prune::run_once(&store, &engine, &settings, Trigger::Api, now_millis())
        .await
        .unwrap();
    store.close().await;
    assert_eq!((run.containers_removed, run.error.as_deref()), (0, None), "{run:?}");
    assert_eq!(container_state(&container).as_deref(), Some("exited"));

    // Back up, drover reads the exit from the container that is still there.
    daemon.launch().await;
    let done = daemon.wait_status(&id, "terminated", WITHIN).await;
    assert_eq!(done["exit_code"], 7, "{done}");
    let last = daemon.events(&id).await.pop().unwrap();
    assert!(
        ["inspect", "docker-event"].contains(&last["source"].as_str().unwrap()),
        "{last}"
    );

    // Now that the exit is recorded, the container may go.
    let (status, run) = daemon.post("/v1/prune", Value::Null).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["containers_removed"], 1, "{run}");
    assert_eq!(container_state(&container), None);
    assert_eq!(daemon.backend(&id).await["exit_code"], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_is_pruned_only_once_min_age_has_passed_since_its_exit() {
    let daemon = Daemon::start_with(DaemonConfig {
        extra_toml: prune_toml("1h", "1s", false),
        ..Default::default()
    })
    .await;
    let id = daemon.spawn(None).await;
    let ready = daemon.wait_status(&id, "ready", WITHIN).await;
    let container = ready["container_id"].as_str().unwrap().to_string();
    // The backend lives longer than min_age: counted from its creation, it
    // would be old enough the moment it stops.
    let created_at = daemon
        .query_one(&format!("SELECT created_at_ms FROM backends WHERE id = '{id}'"))
        .await
        .as_i64()
        .unwrap();
    wait_for("the backend to be older than min_age", WITHIN, || async {
        now_millis() > created_at + 1_500
    })
    .await;
    assert_eq!(daemon.terminate(&id, true).await, 202);
    daemon.wait_status(&id, "terminated", WITHIN).await;
    let exited_at = terminated_at(&daemon, &id).await;
    assert!(exited_at >= created_at + 1_500);

    let (store, engine) = open_instance(&daemon).await;
    let settings = PruneSettings {
        min_age: Duration::from_secs(1),
        images: false,
    };
    let early = prune::run_once(&store, &engine, &settings, Trigger::Api, exited_at + 999)
        .await
        .unwrap();
    assert_eq!(early.containers_removed, 0, "{early:?}");
    assert_eq!(container_state(&container).as_deref(), Some("exited"));

    let due = prune::run_once(&store, &engine, &settings, Trigger::Api, exited_at + 1_000)
        .await
        .unwrap();
    store.close().await;
    assert_eq!((due.containers_removed, due.error.as_deref()), (1, None), "{due:?}");
    assert_eq!(container_state(&container), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_runs_on_its_interval_and_on_request_and_journals_each_pass() {
    let daemon = Daemon::start_with(DaemonConfig {
        extra_toml: prune_toml("200ms", "1s", false),
        ..Default::default()
    })
    .await;
    let id = daemon.spawn_executable(json!({ "image": test_image(), "command": ["sh", "-c", "exit 3"] })).await;
    let done = daemon.wait_status(&id, "terminated", WITHIN).await;
    assert_eq!(done["exit_code"], 3);
    // By name: a container that exits at once may end before drover records its id.
    let container = format!("plane-{id}");
    let exited_at = terminated_at(&daemon, &id).await;

    wait_for("the interval's prune to remove the container", WITHIN, || async {
        container_state(&container).is_none()
    })
    .await;
    let pass = query_json(
        &daemon.db_path(),
        "SELECT started_at, triggered_by FROM prune_runs WHERE containers_removed = 1",
    )
    .await;
    assert_eq!(pass.len(), 1, "{pass:?}");
    assert_eq!(pass[0]["triggered_by"], "interval");
    assert!(pass[0]["started_at"].as_i64().unwrap() >= exited_at + 1_000, "{pass:?} {exited_at}");
    // The backend's record is untouched by the removal.
    assert_eq!(daemon.backend(&id).await["exit_code"], 3);
    assert_eq!(daemon.statuses(&id).await.last().unwrap(), "terminated");

    let (status, run) = daemon.post("/v1/prune", Value::Null).await;
    assert_eq!(status, 200, "{run}");
    for field in ["started_at", "finished_at"] {
        let text = run[field].as_str().unwrap_or_else(|| panic!("{field} in {run}"));
        chrono::DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("{field}: {e}"));
    }
    assert_eq!(run["triggered_by"], "api");
    assert_eq!(run["containers_removed"], 0);
    assert_eq!(run["images_removed"], 0);
    assert_eq!(run["bytes_reclaimed"], 0);
    assert_eq!(run["error"], Value::Null);

    let (status, runs) = daemon.get("/v1/prune-runs").await;
    assert_eq!(status, 200, "{runs}");
    let runs = runs.as_array().unwrap();
    // Interval passes go on meanwhile: find the requested one by its id.
    assert!(runs.iter().any(|r| *r == run), "{run} not in {runs:?}");
    let ids: Vec<i64> = runs.iter().map(|r| r["run_id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "not newest first: {ids:?}");
    assert!(runs.iter().any(|r| r["containers_removed"] == 1 && r["triggered_by"] == "interval"));
    let (status, body) = daemon.get("/v1/prune-runs?limit=0").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_pruning_removes_only_images_drover_pulled() {
    let mut registry = Registry::start().await;
    let pulled = registry.push(test_image(), "prunetest:v1");
    assert!(!image_exists(&pulled));
    let mut daemon = Daemon::start_with(DaemonConfig {
        extra_toml: prune_toml("1h", "0s", false),
        ..Default::default()
    })
    .await;

    // One backend makes drover pull; another uses the test image, which
    // drover did not pull.
    let from_registry = daemon.spawn_executable(json!({ "image": pulled })).await;
    let local = daemon.spawn(None).await;
    daemon.wait_status(&from_registry, "ready", WITHIN).await;
    daemon.wait_status(&local, "ready", WITHIN).await;
    let ledger = query_json(&daemon.db_path(), "SELECT image, digest FROM pulled_images").await;
    let image_id = docker(&["image", "inspect", "-f", "{{.Id}}", &pulled]);
    assert_eq!(ledger, [json!({ "image": pulled, "digest": image_id })]);

    // With images = false, only the containers go.
    daemon.terminate(&from_registry, true).await;
    daemon.terminate(&local, true).await;
    daemon.wait_status(&from_registry, "terminated", WITHIN).await;
    daemon.wait_status(&local, "terminated", WITHIN).await;
    let (status, run) = daemon.post("/v1/prune", Value::Null).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!((run["containers_removed"].clone(), run["images_removed"].clone()), (json!(2), json!(0)), "{run}");
    assert!(image_exists(&pulled));

    // With images = true, an image a live backend uses stays.
    daemon.kill9();
    daemon.config.extra_toml = prune_toml("1h", "0s", true);
    daemon.write_config();
    daemon.launch().await;
    let again = daemon.spawn_executable(json!({ "image": pulled })).await;
    daemon.wait_status(&again, "ready", WITHIN).await;
    let (_, run) = daemon.post("/v1/prune", Value::Null).await;
    assert_eq!(run["images_removed"], 0, "{run}");
    assert!(image_exists(&pulled));

    // Once unused, the pulled image goes; the test image never does.
    daemon.terminate(&again, true).await;
    daemon.wait_status(&again, "terminated", WITHIN).await;
    let (status, run) = daemon.post("/v1/prune", Value::Null).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!((run["containers_removed"].clone(), run["images_removed"].clone()), (json!(1), json!(1)), "{run}");
    assert_eq!(run["error"], Value::Null, "{run}");
    assert!(!image_exists(&pulled));
    assert!(image_exists(test_image()));
    assert_eq!(daemon.query_one("SELECT COUNT(*) FROM pulled_images").await, 0);
    let (_, run) = daemon.post("/v1/prune", Value::Null).await;
    assert_eq!(run["images_removed"], 0, "{run}");
    assert!(image_exists(test_image()));
}
