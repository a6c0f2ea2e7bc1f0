//! Pulls from a real registry (Debian's `docker-registry` on a loopback
//! port): every pull policy, counted by the engine's own `pull` events;
//! htpasswd basic auth with the spawn's credentials; a wrong password and an
//! unknown image ending the backend with the registry's error instead of
//! hanging; and pull progress as the backend's loading detail.

use crate::support::registry::{pulls_of, Registry};
use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;

const READY_WITHIN: Duration = Duration::from_secs(90);

/// Unix seconds a moment ago: the start of the window in which pulls are counted.
fn since() -> i64 {
    chrono::Utc::now().timestamp() - 1
}

async fn spawn_image(daemon: &Daemon, executable: Value) -> String {
    daemon.spawn_executable(executable).await
}

/// Waits for `terminated` and checks it is an `internalerror` with `error`
/// on the backend and on its terminated event; returns the error.
async fn internal_error(daemon: &Daemon, id: &str) -> String {
    let done = daemon.wait_status(id, "terminated", READY_WITHIN).await;
    assert_eq!(done["state"]["reason"], "internalerror", "{done}");
    assert_eq!(done["exit_code"], Value::Null, "{done}");
    let error = done["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {done}"))
        .to_string();
    let last = daemon.events(id).await.pop().unwrap();
    assert_eq!(last["status"], "terminated");
    assert_eq!(
        last["error"],
        error.as_str(),
        "the event keeps the error: {last}"
    );
    assert_eq!(
        daemon.statuses(id).await,
        ["scheduled", "loading", "terminated"]
    );
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_not_present_pulls_an_absent_image_once_and_reuses_it() {
    let mut registry = Registry::start().await;
    let reference = registry.push(test_image(), "drover/ifnotpresent:v1");
    let daemon = Daemon::start().await;
    let since = since();

    let first = spawn_image(
        &daemon,
        json!({"image": reference, "pull_policy": "IfNotPresent"}),
    )
    .await;
    daemon.wait_status(&first, "ready", READY_WITHIN).await;
    let second = spawn_image(&daemon, json!({"image": reference})).await;
    daemon.wait_status(&second, "ready", READY_WITHIN).await;

    assert_eq!(pulls_of(&reference, since), 1, "one pull for two backends");
    assert_eq!(
        daemon.statuses(&second).await,
        ["scheduled", "loading", "starting", "waiting", "ready"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_pulls_for_every_spawn() {
    let mut registry = Registry::start().await;
    let reference = registry.push(test_image(), "drover/always:v1");
    let daemon = Daemon::start().await;
    let since = since();

    for expected_pulls in 1..=2 {
        let id = spawn_image(
            &daemon,
            json!({"image": reference, "pull_policy": "Always"}),
        )
        .await;
        daemon.wait_status(&id, "ready", READY_WITHIN).await;
        assert_eq!(pulls_of(&reference, since), expected_pulls);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_ends_the_backend_cleanly_when_the_image_is_absent_and_pulls_nothing() {
    let mut registry = Registry::start().await;
    // In the registry, not on the host: Never must not fetch it.
    let reference = registry.push(test_image(), "drover/never:v1");
    let daemon = Daemon::start().await;
    let since = since();

    let absent = spawn_image(&daemon, json!({"image": reference, "pull_policy": "Never"})).await;
    let error = internal_error(&daemon, &absent).await;
    let present = spawn_image(
        &daemon,
        json!({"image": test_image(), "pull_policy": "Never"}),
    )
    .await;
    daemon.wait_status(&present, "ready", READY_WITHIN).await;

    assert_eq!(
        error,
        format!("image {reference} is not present and pull_policy is Never")
    );
    assert_eq!(pulls_of(&reference, since), 0);
    assert_eq!(
        daemon.containers().len(),
        1,
        "no container for the absent image"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_registry_is_pulled_with_the_spawns_credentials_and_refuses_others() {
    const PASSWORD: &str = "s3cret-registry-password-4711";
    const WRONG: &str = "wrong-registry-password-0815";
    let mut registry = Registry::start().await;
    let reference = registry.push(test_image(), "drover/private:v1");
    registry.require_auth("drover", PASSWORD).await;
    let daemon = Daemon::start().await;
    let since = since();

    let anonymous = spawn_image(&daemon, json!({"image": reference})).await;
    let anonymous_error = internal_error(&daemon, &anonymous).await;
    let wrong = spawn_image(
        &daemon,
        json!({"image": reference, "credentials": {"username": "drover", "password": WRONG}}),
    )
    .await;
    let wrong_error = internal_error(&daemon, &wrong).await;
    let right = spawn_image(
        &daemon,
        json!({"image": reference, "credentials": {"username": "drover", "password": PASSWORD}}),
    )
    .await;
    daemon.wait_status(&right, "ready", READY_WITHIN).await;

    let failed = format!("pull of {reference} failed: docker refused (500): ");
    assert!(anonymous_error.starts_with(&failed), "{anonymous_error}");
    assert!(
        anonymous_error.ends_with("no basic auth credentials"),
        "{anonymous_error}"
    );
    assert!(wrong_error.starts_with(&failed), "{wrong_error}");
    assert!(wrong_error.contains("unauthorized"), "{wrong_error}");
    assert_eq!(
        pulls_of(&reference, since),
        1,
        "only the right password pulled"
    );
    // The passwords are nowhere but in the spec column drover needs to pull again.
    let mut shown = Vec::new();
    for id in [&anonymous, &wrong, &right] {
        shown.push(daemon.backend(id).await.to_string());
        shown.push(Value::Array(daemon.events(id).await).to_string());
    }
    shown.push(daemon.get("/v1/backends").await.1.to_string());
    let history = query_json(&daemon.db_path(), "SELECT * FROM backend_events").await;
    shown.push(Value::Array(history).to_string());
    shown.push(daemon.log());
    for text in &shown {
        for secret in [PASSWORD, WRONG] {
            assert!(!text.contains(secret), "password leaked: {text}");
        }
    }
    assert_eq!(
        daemon.backend(&right).await["executable"]["credentials"]["password"],
        "<redacted>"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_image_ends_the_backend_with_the_registrys_error_not_a_hang() {
    let registry = Registry::start().await;
    let reference = registry.reference("drover/nosuchimage:v1");
    let daemon = Daemon::start().await;

    let id = spawn_image(
        &daemon,
        json!({"image": reference, "pull_policy": "Always"}),
    )
    .await;
    let error = internal_error(&daemon, &id).await;

    assert!(
        error.starts_with(&format!("pull of {reference} failed: ")),
        "{error}"
    );
    assert!(
        error.contains("not found") || error.contains("manifest unknown"),
        "{error}"
    );
    assert!(daemon.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_progress_is_logged_at_debug_and_shown_as_the_loading_detail() {
    let mut registry = Registry::start().await;
    let reference = registry.push(test_image(), "drover/progress:v1");
    let daemon = Daemon::start().await;

    let id = spawn_image(&daemon, json!({"image": reference})).await;
    daemon.wait_status(&id, "ready", READY_WITHIN).await;

    let detail = format!("Status: Downloaded newer image for {reference}");
    assert_eq!(daemon.backend(&id).await["loading_detail"], detail.as_str());
    let (_, list) = daemon.get("/v1/backends").await;
    assert_eq!(list[0]["loading_detail"], detail.as_str());
    assert_eq!(
        daemon
            .query_one(&format!(
                "SELECT loading_detail FROM backends WHERE id = '{id}'"
            ))
            .await,
        detail.as_str()
    );
    let status = std::process::Command::new(BIN)
        .args(["--api", &daemon.url(""), "status", &id])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{printed}");
    assert!(
        printed.lines().any(|l| l == format!("loading    {detail}")),
        "{printed}"
    );
    let log = daemon.log();
    let progress: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("DEBUG") && l.contains("pull progress") && l.contains(&reference))
        .collect();
    // The layers are the test image's, already on the host: no download lines.
    assert!(
        progress
            .iter()
            .any(|l| l.contains("Pulling from drover/progress")),
        "{log}"
    );
    assert!(progress.iter().any(|l| l.contains(&detail)), "{log}");
}
