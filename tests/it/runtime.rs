//! The runtime facade (`drover::runtime`), embedded in-process with
//! `DroverRuntime::start` on a temp database, side by side with the semantics
//! of Plane's Docker runtime: what `spawn`, `terminate`, `events` and
//! `wait_for_backend` report, checked against Docker and the tables.

use crate::support::*;
use drover::config::{Config, DockerConfig};
use drover::model::BackendName;
use drover::runtime::{
    AcquiredKey, BackendError, DroverRuntime, KeyConfig, RecordedExit, Runtime, RuntimeError,
    TerminateEvent,
};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(90);

/// A command that waits (not listening) until `/tmp/go` exists, then exits 3.
const EXIT_3_ON_GO: &str = "while [ ! -e /tmp/go ]; do sleep 0.1; done; exit 3";
/// A command that handles SIGTERM by exiting 42.
const EXIT_42_ON_TERM: &str = "trap 'exit 42' TERM; while true; do sleep 0.1; done";

/// A temp folder for one embedded drover (database and mount base); dropping
/// it removes every container of its instance.
struct Host {
    dir: tempfile::TempDir,
    startup_timeout: Duration,
    instance_id: String,
}

impl Host {
    fn new() -> Host {
        test_image();
        Host {
            dir: tempfile::tempdir().expect("temp dir"),
            startup_timeout: Duration::from_secs(20),
            instance_id: String::new(),
        }
    }

    fn config(&self) -> Config {
        let defaults = Config::default();
        let mut config = Config {
            db_path: self.dir.path().join("drover.db"),
            docker: DockerConfig {
                mount_base: Some(self.dir.path().join("mounts")),
                ..defaults.docker
            },
            ..defaults
        };
        config.reconcile.resync_interval = Duration::from_millis(500);
        config.reconcile.soft_terminate_grace = Duration::from_secs(10);
        config.reconcile.startup_timeout = self.startup_timeout;
        config
    }

    async fn start(&mut self) -> DroverRuntime {
        let _ = tracing_subscriber::fmt().with_env_filter("drover=debug").with_test_writer().try_init();
        let runtime = DroverRuntime::start(self.config()).await.expect("runtime starts");
        self.instance_id = runtime.instance_id().to_string();
        runtime
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if !self.instance_id.is_empty() {
            remove_instance_containers(&self.instance_id);
        }
    }
}

fn httpd() -> Value {
    json!({ "image": test_image() })
}

fn shell(script: &str) -> Value {
    json!({ "image": test_image(), "command": ["sh", "-c", script] })
}

fn inspect(container: &str, template: &str) -> String {
    docker(&["inspect", "--format", template, container])
}

/// Reads `stream` until it has seen the end of every backend in `ids`;
/// returns each one's events, in arrival order.
async fn exits_of<S, T>(stream: &mut S, ids: &[&BackendName], backend_of: impl Fn(&T) -> &BackendName) -> BTreeMap<BackendName, Vec<T>>
where
    S: futures::Stream<Item = T> + Unpin,
{
    let mut seen: BTreeMap<BackendName, Vec<T>> = BTreeMap::new();
    while !ids.iter().all(|id| seen.contains_key(*id)) {
        let item = tokio::time::timeout(WITHIN, stream.next())
            .await
            .expect("an exit within the timeout")
            .expect("the stream goes on");
        let id = backend_of(&item).clone();
        seen.entry(id).or_default().push(item);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_reports_false_for_unknown_and_finished_backends() {
    let mut host = Host::new();
    let runtime = host.start().await;
    let unknown = BackendName::parse("ba-never-spawned").unwrap();
    assert!(!runtime.terminate(&unknown, false).await.unwrap());
    assert!(!runtime.terminate(&unknown, true).await.unwrap());

    let mut exits = runtime.events();
    let id = BackendName::new_random();
    runtime.spawn(&id, httpd(), None, None).await.unwrap();
    assert!(runtime.terminate(&id, true).await.unwrap());
    let ended = exits_of(&mut exits, &[&id], |e: &TerminateEvent| &e.backend_id).await;
    assert_eq!(ended[&id], [TerminateEvent { backend_id: id.clone(), exit_code: Some(137) }]);

    assert!(!runtime.terminate(&id, false).await.unwrap());
    assert!(!runtime.terminate(&id, true).await.unwrap());
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_validates_the_spec_without_touching_docker() {
    let mut host = Host::new();
    let runtime = host.start().await;
    runtime.prepare(&httpd()).await.unwrap();
    runtime
        .prepare(&json!({ "image": "not-pulled-anywhere/nothing:1", "pull_policy": "Never" }))
        .await
        .unwrap();
    let invalid = runtime.prepare(&json!({ "image": "Upper/Case" })).await.unwrap_err();
    assert!(invalid.to_string().starts_with("executable.image:"), "{invalid}");
    let escape = runtime
        .prepare(&json!({ "image": test_image(), "mount": "../outside" }))
        .await
        .unwrap_err();
    assert!(escape.to_string().starts_with("executable.mount:"), "{escape}");
    let id = BackendName::new_random();
    let keyless = runtime
        .spawn(&id, json!({ "image": test_image(), "mount": true }), None, None)
        .await
        .unwrap_err();
    assert!(matches!(keyless, RuntimeError::Invalid(_)), "{keyless}");
    assert!(runtime.store().get_backend(&id).await.unwrap().is_none());
    // prepare recorded nothing and pulled nothing.
    assert_eq!(runtime.last_event_id().await.unwrap(), 0);
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_returns_the_real_container_id_and_port() {
    let mut host = Host::new();
    let runtime = host.start().await;
    let id = BackendName::new_random();
    let started = runtime.spawn(&id, httpd(), None, None).await.unwrap();

    let container = id.container_name();
    assert_eq!(started.container_id, inspect(&container, "{{.Id}}"));
    let port = inspect(&container, "{{(index (index .NetworkSettings.Ports \"8080/tcp\") 0).HostPort}}");
    assert_eq!(started.port.to_string(), port);
    let row = runtime.store().get_backend(&id).await.unwrap().unwrap();
    assert_eq!(row.container_id.as_deref(), Some(started.container_id.as_str()));
    assert!(row.state.address().unwrap().ends_with(&format!(":{port}")));

    // Spawning the same id with the same executable waits for the same backend.
    let again = runtime.spawn(&id, httpd(), None, None).await.unwrap();
    assert_eq!(again, started);
    let other = runtime.spawn(&id, shell("exit 0"), None, None).await.unwrap_err();
    assert!(matches!(other, RuntimeError::Conflict(_)), "{other}");
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_yield_the_exit_code_of_each_kind_of_exit() {
    let mut host = Host::new();
    let runtime = host.start().await;
    let mut events = runtime.events();
    let self_exit = BackendName::new_random();
    let handles_term = BackendName::new_random();
    let killed = BackendName::new_random();
    let (a, b, c) = tokio::join!(
        runtime.spawn(&self_exit, shell(EXIT_3_ON_GO), None, None),
        runtime.spawn(&handles_term, shell(EXIT_42_ON_TERM), None, None),
        runtime.spawn(&killed, httpd(), None, None),
    );
    let self_exit_container = a.unwrap().container_id;
    b.unwrap();
    c.unwrap();

    docker(&["exec", &self_exit_container, "touch", "/tmp/go"]);
    assert!(runtime.terminate(&handles_term, false).await.unwrap());
    assert!(runtime.terminate(&killed, true).await.unwrap());

    let ended = exits_of(
        &mut events,
        &[&self_exit, &handles_term, &killed],
        |e: &TerminateEvent| &e.backend_id,
    )
    .await;
    let codes: Vec<(BackendName, Vec<Option<i32>>)> = [&self_exit, &handles_term, &killed]
        .into_iter()
        .map(|id| (id.clone(), ended[id].iter().map(|e| e.exit_code).collect()))
        .collect();
    assert_eq!(
        codes,
        [
            (self_exit.clone(), vec![Some(3)]),
            (handles_term.clone(), vec![Some(42)]),
            (killed.clone(), vec![Some(137)]),
        ]
    );
    // The table holds what the facade reported.
    for (id, code) in [(&self_exit, 3), (&handles_term, 42), (&killed, 137)] {
        let row = runtime.store().get_backend(id).await.unwrap().unwrap();
        assert_eq!(row.exit_code, Some(code), "{id}");
    }
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_subscriber_resuming_from_an_id_misses_nothing() {
    let mut host = Host::new();
    let runtime = host.start().await;
    let head = runtime.last_event_id().await.unwrap();
    let mut early = runtime.exits_after(head);
    let first = BackendName::new_random();
    let second = BackendName::new_random();
    for id in [&first, &second] {
        runtime.spawn(id, httpd(), None, None).await.unwrap();
        assert!(runtime.terminate(id, true).await.unwrap());
    }
    let seen_early = exits_of(&mut early, &[&first, &second], |e: &RecordedExit| &e.event.backend_id).await;

    // Attached after both exits: resuming from the same id yields the same exits.
    let mut late = runtime.exits_after(head);
    let seen_late = exits_of(&mut late, &[&first, &second], |e: &RecordedExit| &e.event.backend_id).await;
    assert_eq!(seen_late, seen_early);
    for id in [&first, &second] {
        assert_eq!(seen_late[id].len(), 1);
        assert_eq!(seen_late[id][0].event.exit_code, Some(137));
    }

    // Resuming after the first exit's id yields the second and nothing before.
    let mut ordered: Vec<&RecordedExit> = seen_late.values().flatten().collect();
    ordered.sort_by_key(|e| e.event_id);
    let mut resumed = runtime.exits_after(ordered[0].event_id);
    let next = tokio::time::timeout(WITHIN, resumed.next()).await.unwrap().unwrap();
    assert_eq!(&next, ordered[1]);
    runtime.shutdown().await;
    assert!(resumed.next().await.is_none(), "streams end at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_recorded_after_a_restart_reaches_a_named_subscriber_that_acked_before() {
    let mut host = Host::new();
    let runtime = host.start().await;
    let mut forwarder = runtime.subscribe("forwarder").await.unwrap();
    assert_eq!(forwarder.acked(), 0);
    let before = BackendName::new_random();
    runtime.spawn(&before, httpd(), None, None).await.unwrap();
    assert!(runtime.terminate(&before, true).await.unwrap());
    let handled = tokio::time::timeout(WITHIN, forwarder.next()).await.unwrap().unwrap();
    assert_eq!(handled.event, TerminateEvent { backend_id: before.clone(), exit_code: Some(137) });
    forwarder.ack(handled.event_id).await.unwrap();
    let ahead = forwarder.ack(handled.event_id + 1000).await.unwrap_err();
    assert!(matches!(ahead, RuntimeError::AckAhead(_)), "{ahead}");

    let during = BackendName::new_random();
    let started = runtime.spawn(&during, httpd(), None, None).await.unwrap();
    runtime.shutdown().await;
    drop(forwarder);

    // While nothing runs, the container is killed: only the next start can record it.
    docker(&["kill", &started.container_id]);
    let runtime = host.start().await;
    let mut forwarder = runtime.subscribe("forwarder").await.unwrap();
    assert_eq!(forwarder.acked(), handled.event_id);
    let next = tokio::time::timeout(WITHIN, forwarder.next()).await.unwrap().unwrap();
    assert_eq!(next.event, TerminateEvent { backend_id: during.clone(), exit_code: Some(137) });
    assert!(next.event_id > handled.event_id);

    // The runtime's own events() stream sees the exit recorded by its boot pass too.
    let mut events = runtime.events();
    let ended = exits_of(&mut events, &[&during], |e: &TerminateEvent| &e.backend_id).await;
    assert_eq!(ended[&during].len(), 1);
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_and_static_token_reach_the_container_and_the_key_names_its_folder() {
    let mut host = Host::new();
    let runtime = host.start().await;
    let id = BackendName::new_random();
    let secret = "static-secret-4f8a1c";
    let key = AcquiredKey {
        key: KeyConfig {
            name: "doc-7341".into(),
            namespace: "docs".into(),
            tag: "v1".into(),
        },
        token: 9001,
    };
    let executable = json!({ "image": test_image(), "mount": true });
    let started = runtime
        .spawn(&id, executable, Some(key), Some(secret.to_string()))
        .await
        .unwrap();

    let env: Vec<String> =
        serde_json::from_str(&inspect(&started.container_id, "{{json .Config.Env}}")).unwrap();
    for wanted in [
        "SESSION_BACKEND_KEY=doc-7341".to_string(),
        "SESSION_BACKEND_FENCING_TOKEN=9001".to_string(),
        format!("SESSION_BACKEND_STATIC_TOKEN={secret}"),
        format!("SESSION_BACKEND_ID={id}"),
    ] {
        assert!(env.contains(&wanted), "{wanted} missing from {env:?}");
    }
    let mounts = inspect(&started.container_id, "{{range .Mounts}}{{.Source}} {{.Destination}}{{end}}");
    let folder = host.dir.path().join("mounts").join("doc-7341").canonicalize().unwrap();
    assert_eq!(mounts, format!("{} /plane-data", folder.display()));

    // The secret stays out of history and out of what the API shows.
    let history = query_json(&host.config().db_path, "SELECT state, error, source FROM backend_events").await;
    assert!(!history.is_empty());
    assert!(!Value::Array(history).to_string().contains(secret));
    let row = runtime.store().get_backend(&id).await.unwrap().unwrap();
    let view = serde_json::to_string(&drover::api::BackendView::from(&row)).unwrap();
    assert!(!view.contains(secret), "{view}");
    runtime.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_backend_is_ok_when_ready_and_a_startup_timeout_when_it_never_listens() {
    let mut host = Host::new();
    host.startup_timeout = Duration::from_secs(3);
    let runtime = host.start().await;
    let address = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));

    let ready = BackendName::new_random();
    let silent = BackendName::new_random();
    let (a, b) = tokio::join!(
        runtime.spawn(&ready, httpd(), None, None),
        runtime.spawn(&silent, shell("sleep 3600"), None, None),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let (ready_wait, silent_wait) = tokio::join!(
        runtime.wait_for_backend(&ready, address(a.port)),
        runtime.wait_for_backend(&silent, address(b.port)),
    );
    assert_eq!(ready_wait, Ok(()));
    assert_eq!(silent_wait, Err(BackendError::StartupTimeout));
    let page = reqwest::get(format!("http://127.0.0.1:{}/", a.port)).await.unwrap().text().await.unwrap();
    assert_eq!(page, "hello from drover-test\n");

    let missing = BackendName::new_random();
    assert!(matches!(
        runtime.wait_for_backend(&missing, address(1)).await,
        Err(BackendError::Other(_))
    ));
    runtime.shutdown().await;
}
