//! Hostile and broken input to the API: every field of the spawn body wrong in
//! type, range or format, hostile backend ids and image references, oversized
//! environments and bodies, unknown fields, and a burst of concurrent spawns
//! of one id. Each case asserts the exact error and that nothing was written.
//! (The ordinary bad-input contract, 400 naming the field, is `api.rs`'s.)

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

/// A spawn body around `executable`, with the test image unless it sets its own.
fn with_image(mut executable: Value) -> Vec<u8> {
    if executable.get("image").is_none() {
        executable["image"] = json!(test_image());
    }
    json!({ "executable": executable }).to_string().into_bytes()
}

/// `(what, body, exact error)`: the spawn bodies that must be refused.
fn hostile_spawn_bodies() -> Vec<(&'static str, Vec<u8>, String)> {
    let image = test_image();
    let raw = |text: &str| text.as_bytes().to_vec();
    let id_body = |id: &str| {
        json!({ "id": id, "executable": { "image": image } })
            .to_string()
            .into_bytes()
    };
    let id_char_error = |c: char| {
        format!("id: backend id may only contain lowercase letters, digits and '-' (found {c:?})")
    };
    let many_env: serde_json::Map<String, Value> = (0..10_000)
        .map(|i| (format!("VAR_{i}"), json!("x")))
        .collect();
    let big_env = json!({ "A": "x".repeat(40_000), "B": "y".repeat(40_000) });
    let limits = |limits: Value| with_image(json!({ "resource_limits": limits }));
    let lower_words = "lowercase letters and digits, separated by '.', '_', '__' or dashes";
    vec![
        // --- the body itself and the id ---
        ("body not JSON", raw("executable"), "invalid request body: expected value at line 1 column 1".into()),
        (
            "trailing garbage",
            raw(r#"{"executable": {"image": "busybox"}} x"#),
            "invalid request body: trailing characters at line 1 column 38".into(),
        ),
        ("body an array", raw(" [\"ba-x\", {}]"), "invalid request body: invalid type: sequence, expected an object".into()),
        ("id a number", raw(r#"{"id": 5, "executable": {"image": "busybox"}}"#), "id: invalid type: integer `5`, expected a string at line 1 column 8".into()),
        ("id uppercase", id_body("ba-Upper"), id_char_error('U')),
        ("id uppercase prefix", id_body("BA-upper"), "id: backend id must start with \"ba-\"".into()),
        ("id with a space", id_body("ba-a b"), id_char_error(' ')),
        ("id with unicode", id_body("ba-caf\u{e9}"), id_char_error('\u{e9}')),
        ("id with an emoji", id_body("ba-\u{1F600}"), id_char_error('\u{1F600}')),
        ("id with a NUL", id_body("ba-a\u{0}"), id_char_error('\0')),
        ("id with a slash", id_body("ba-a/b"), id_char_error('/')),
        ("id of 46 characters", id_body(&format!("ba-{}", "a".repeat(43))), "id: backend id is longer than 45 characters".into()),
        ("id of 1000 characters", id_body(&format!("ba-{}", "a".repeat(997))), "id: backend id is longer than 45 characters".into()),
        ("id only the prefix", id_body("ba-"), "id: backend id has nothing after \"ba-\"".into()),
        // --- executable ---
        ("executable a string", raw(r#"{"executable": "busybox"}"#), "executable: invalid type: string \"busybox\", expected struct ExecutorSpec".into()),
        ("executable an array", raw(r#"{"executable": ["busybox"]}"#), "executable: invalid type: sequence, expected struct ExecutorSpec".into()),
        ("executable null", raw(r#"{"executable": null}"#), "executable: invalid type: null, expected struct ExecutorSpec".into()),
        ("no image", raw(r#"{"executable": {}}"#), "executable: missing field `image`".into()),
        // --- image ---
        ("image a number", with_image(json!({"image": 5})), "executable.image: invalid type: integer `5`, expected a string".into()),
        ("image blank", with_image(json!({"image": "   "})), "executable.image: must not be empty".into()),
        ("image with a space", with_image(json!({"image": "busy box"})), "executable.image: invalid character ' ' in image reference".into()),
        ("image with a newline", with_image(json!({"image": "busybox\n"})), "executable.image: invalid character '\\n' in image reference".into()),
        ("image with unicode", with_image(json!({"image": "b\u{fc}sybox"})), "executable.image: invalid character '\u{fc}' in image reference".into()),
        ("image uppercase", with_image(json!({"image": "Busybox"})), "executable.image: repository name must be lowercase".into()),
        ("image uppercase path", with_image(json!({"image": "ghcr.io/Org/app:1"})), "executable.image: repository name must be lowercase".into()),
        ("image empty tag", with_image(json!({"image": "busybox:"})), "executable.image: invalid tag \"\" (letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-')".into()),
        ("image tag starting with a dot", with_image(json!({"image": "busybox:.x"})), "executable.image: invalid tag \".x\" (letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-')".into()),
        ("image empty component", with_image(json!({"image": "a//b"})), format!("executable.image: invalid repository name component \"\" ({lower_words})")),
        ("image component with a bad separator", with_image(json!({"image": "a..b"})), format!("executable.image: invalid repository name component \"a..b\" ({lower_words})")),
        ("image bad digest", with_image(json!({"image": "busybox@sha256:xyz"})), "executable.image: invalid digest \"sha256:xyz\" (expected algorithm:hex)".into()),
        ("image bad registry host", with_image(json!({"image": "-bad.io/app"})), "executable.image: invalid registry host \"-bad.io\"".into()),
        ("image name too long", with_image(json!({"image": format!("a/{}", "b".repeat(300))})), "executable.image: repository name is longer than 255 characters".into()),
        // --- pull policy and credentials ---
        ("unknown pull policy", with_image(json!({"pull_policy": "Sometimes"})), "executable.pull_policy: unknown variant `Sometimes`, expected one of `IfNotPresent`, `Always`, `Never`".into()),
        ("pull policy lowercase", with_image(json!({"pull_policy": "always"})), "executable.pull_policy: unknown variant `always`, expected one of `IfNotPresent`, `Always`, `Never`".into()),
        ("pull policy a number", with_image(json!({"pull_policy": 1})), "executable.pull_policy: invalid type: integer `1`, expected string or map".into()),
        ("credentials a string", with_image(json!({"credentials": "u:p"})), "executable.credentials: invalid type: string \"u:p\", expected struct RegistryCredentials".into()),
        ("credentials an array", with_image(json!({"credentials": ["u", "p"]})), "executable.credentials: invalid type: sequence, expected struct RegistryCredentials".into()),
        ("credentials without password", with_image(json!({"credentials": {"username": "u"}})), "executable.credentials: missing field `password`".into()),
        ("credentials with an unknown field", with_image(json!({"credentials": {"username": "u", "password": "p", "token": "t"}})), "executable.credentials: unknown field `token`, expected `username` or `password`".into()),
        ("credentials with an empty username", with_image(json!({"credentials": {"username": "", "password": "p"}})), "executable.credentials.username: must not be empty".into()),
        ("credentials password a number", with_image(json!({"credentials": {"username": "u", "password": 1234}})), "executable.credentials.password: invalid type: integer `1234`, expected a string".into()),
        // --- env ---
        ("env a list", with_image(json!({"env": ["A=1"]})), "executable.env: invalid type: sequence, expected a map".into()),
        ("env value a number", with_image(json!({"env": {"A": 1}})), "executable.env.A: invalid type: integer `1`, expected a string".into()),
        ("env value null", with_image(json!({"env": {"A": null}})), "executable.env.A: invalid type: null, expected a string".into()),
        ("env key empty", with_image(json!({"env": {"": "1"}})), "executable.env: empty variable name".into()),
        ("env key with =", with_image(json!({"env": {"A=B": "1"}})), "executable.env.A=B: variable name may not contain '=' or NUL".into()),
        ("env key with NUL", with_image(json!({"env": {"A\u{0}B": "1"}})), "executable.env.A\\0B: variable name may not contain '=' or NUL".into()),
        ("env value with NUL", with_image(json!({"env": {"A": "1\u{0}"}})), "executable.env.A: value may not contain NUL".into()),
        ("10,000 env vars", with_image(json!({"env": many_env})), "executable.env: at most 1000 variables, got 10000".into()),
        ("env over 64 KiB", with_image(json!({"env": big_env})), "executable.env: at most 65536 bytes in all, got 80006".into()),
        // --- resource limits ---
        ("limits a list", with_image(json!({"resource_limits": [1]})), "executable.resource_limits: invalid type: sequence, expected struct ResourceLimits".into()),
        ("limit a string", limits(json!({"cpu_period": "100000"})), "executable.resource_limits.cpu_period: invalid type: string \"100000\", expected i64".into()),
        ("limit a float", limits(json!({"memory_limit_bytes": 1.5e7})), "executable.resource_limits.memory_limit_bytes: invalid type: floating point `15000000.0`, expected i64".into()),
        ("limit past i64", raw(&format!(r#"{{"executable": {{"image": "{image}", "resource_limits": {{"disk_limit_bytes": 9223372036854775808}}}}}}"#)), "executable.resource_limits.disk_limit_bytes: invalid value: integer `9223372036854775808`, expected i64".into()),
        ("limit a boolean", limits(json!({"cpu_time_limit": true})), "executable.resource_limits.cpu_time_limit: invalid type: boolean `true`, expected i64".into()),
        ("unknown limit", limits(json!({"gpus": 1})), "executable.resource_limits: unknown field `gpus`, expected one of `cpu_period`, `cpu_period_percent`, `cpu_time_limit`, `memory_limit_bytes`, `disk_limit_bytes`".into()),
        ("cpu period zero", limits(json!({"cpu_period": 0})), "executable.resource_limits.cpu_period: must be positive, got 0".into()),
        ("cpu period below 1 ms", limits(json!({"cpu_period": 999})), "executable.resource_limits.cpu_period: must be between 1000 and 1000000 microseconds, got 999".into()),
        ("cpu period above 1 s", limits(json!({"cpu_period": 1_000_001})), "executable.resource_limits.cpu_period: must be between 1000 and 1000000 microseconds, got 1000001".into()),
        ("cpu percent negative", limits(json!({"cpu_period_percent": -5})), "executable.resource_limits.cpu_period_percent: must be positive, got -5".into()),
        ("cpu percent huge", limits(json!({"cpu_period_percent": i64::MAX})), "executable.resource_limits.cpu_period_percent: must be at most 100000, got 9223372036854775807".into()),
        ("cpu quota below 1 ms", limits(json!({"cpu_period": 1000, "cpu_period_percent": 50})), "executable.resource_limits.cpu_period_percent: 50% of a 1000 microsecond period is 500 microseconds; the least is 1000".into()),
        ("cpu time negative", limits(json!({"cpu_time_limit": -1})), "executable.resource_limits.cpu_time_limit: must be positive, got -1".into()),
        ("memory below Docker's minimum", limits(json!({"memory_limit_bytes": 1_000_000})), "executable.resource_limits.memory_limit_bytes: must be at least 6291456 (6 MiB), got 1000000".into()),
        ("memory negative", limits(json!({"memory_limit_bytes": i64::MIN})), "executable.resource_limits.memory_limit_bytes: must be positive, got -9223372036854775808".into()),
        ("disk zero", limits(json!({"disk_limit_bytes": 0})), "executable.resource_limits.disk_limit_bytes: must be positive, got 0".into()),
        // --- mount, network, command ---
        ("mount a number", with_image(json!({"mount": 5})), "executable.mount: invalid type: integer `5`, expected true, false or a relative path".into()),
        ("mount empty", with_image(json!({"mount": ""})), "executable.mount: path must not be empty".into()),
        ("mount the base itself", with_image(json!({"mount": "./."})), "executable.mount: path must name a folder under the mount base, not the base itself".into()),
        ("mount with ..", with_image(json!({"mount": "a/../../x"})), "executable.mount: path may not contain '..'".into()),
        ("mount absolute", with_image(json!({"mount": "/etc"})), "executable.mount: path must be relative to the mount base".into()),
        ("mount with NUL", with_image(json!({"mount": "a\u{0}b"})), "executable.mount: path may not contain NUL".into()),
        ("mount disabled", with_image(json!({"mount": "sessions/one"})), "executable.mount: mounts are disabled (docker.mount_base is not configured)".into()),
        ("network a number", with_image(json!({"network_name": 7})), "executable.network_name: invalid type: integer `7`, expected a string".into()),
        ("network empty", with_image(json!({"network_name": ""})), "executable.network_name: must not be empty".into()),
        ("network with a space", with_image(json!({"network_name": "my net"})), "executable.network_name: invalid network name \"my net\" (letters, digits, '_', '.', '-'; at most 128)".into()),
        ("network of another container", with_image(json!({"network_name": "container:abc"})), "executable.network_name: invalid network name \"container:abc\" (letters, digits, '_', '.', '-'; at most 128)".into()),
        ("network host", with_image(json!({"network_name": "host"})), "executable.network_name: network \"host\" is not allowed: a backend needs its own network namespace and a published port".into()),
        ("command a string", with_image(json!({"command": "sh -c true"})), "executable.command: invalid type: string \"sh -c true\", expected a sequence".into()),
        ("command empty", with_image(json!({"command": []})), "executable.command: must not be an empty list".into()),
        ("command argument a number", with_image(json!({"command": ["sleep", 5]})), "executable.command[1]: invalid type: integer `5`, expected a string".into()),
        ("command argument with NUL", with_image(json!({"command": ["a\u{0}"]})), "executable.command: argument contains NUL".into()),
        // --- unknown fields are refused at every level ---
        ("unknown executable field", with_image(json!({"colour": "red"})), "executable: unknown field `colour`, expected one of `image`, `pull_policy`, `credentials`, `env`, `resource_limits`, `mount`, `network_name`, `command`".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_spawn_body_is_a_400_with_its_exact_error_and_writes_nothing() {
    let daemon = Daemon::start().await;
    let mut wrong = Vec::new();
    for (what, body, expected) in hostile_spawn_bodies() {
        let (status, answer) = daemon.post_raw("/v1/backends", body).await;
        let error = answer["error"].as_str().unwrap_or_default();
        if status != 400 || error != expected {
            wrong.push(format!(
                "{what}: got {status} {error:?}\n{:>w$}expected 400 {expected:?}",
                "",
                w = what.len() + 2
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} case(s) wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

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
async fn unknown_top_level_fields_are_refused_by_name() {
    let daemon = Daemon::start().await;
    let body = json!({ "executable": { "image": test_image() }, "colour": "red" });

    let (status, answer) = daemon.post("/v1/backends", body).await;

    assert_eq!(status, 400, "{answer}");
    // The list of expected fields grows with the API; the refusal names the stranger.
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.starts_with("invalid request body: unknown field `colour`, expected "),
        "{error}"
    );
    assert_eq!(count(&daemon, "backends").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ids_in_the_path_are_400_and_unknown_ones_404() {
    let daemon = Daemon::start().await;
    let cases = [
        (
            "ba-caf%C3%A9",
            "id: backend id may only contain lowercase letters, digits and '-' (found '\u{e9}')",
        ),
        (
            "ba-a%20b",
            "id: backend id may only contain lowercase letters, digits and '-' (found ' ')",
        ),
        (
            "ba-UP",
            "id: backend id may only contain lowercase letters, digits and '-' (found 'U')",
        ),
        (
            "ba-a%00",
            "id: backend id may only contain lowercase letters, digits and '-' (found '\\0')",
        ),
    ];
    for (raw, expected) in cases {
        for path in [
            format!("/v1/backends/{raw}"),
            format!("/v1/backends/{raw}/events"),
        ] {
            let (status, body) = daemon.get(&path).await;
            assert_eq!(
                (status, body["error"].as_str().unwrap_or_default()),
                (400, expected),
                "{path}"
            );
        }
        let (status, body) = daemon
            .post(&format!("/v1/backends/{raw}/terminate"), json!({}))
            .await;
        assert_eq!(
            (status, body["error"].as_str().unwrap_or_default()),
            (400, expected),
            "{raw}"
        );
    }
    let long = format!("ba-{}", "a".repeat(43));
    let (status, body) = daemon.get(&format!("/v1/backends/{long}")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "id: backend id is longer than 45 characters");

    let (status, body) = daemon
        .post(
            "/v1/backends/ba-nosuchbackend/terminate",
            json!({"hard": true}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "no backend ba-nosuchbackend");
    assert_eq!(count(&daemon, "backends").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_mib_spawn_body_is_a_413_with_a_json_error() {
    let daemon = Daemon::start().await;
    // Valid JSON all the way, so only the size can be the reason.
    let padding = "x".repeat(5 * 1024 * 1024);
    let body = json!({ "executable": { "image": test_image(), "env": { "PAD": padding } } });

    let (status, answer) = daemon
        .post_raw("/v1/backends", body.to_string().into_bytes())
        .await;

    assert_eq!(status, 413, "{answer}");
    assert_eq!(
        answer,
        json!({"error": "request body larger than 1048576 bytes"})
    );
    assert_eq!(count(&daemon, "backends").await, 0);
    // The daemon is unharmed.
    let (status, _) = daemon.get("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_spawns_of_one_id_make_one_backend_and_one_container() {
    let daemon = Daemon::start().await;
    let id = format!("ba-burst{}", free_port());
    let body = json!({ "id": id, "executable": { "image": test_image() } });

    let answers =
        futures::future::join_all((0..20).map(|_| daemon.post("/v1/backends", body.clone()))).await;

    let mut statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
    statuses.sort();
    let mut expected = vec![200; 19];
    expected.push(201);
    assert_eq!(statuses, expected, "{answers:?}");
    assert!(
        answers.iter().all(|(_, b)| b["id"] == id.as_str()),
        "{answers:?}"
    );
    daemon.wait_status(&id, "ready", READY_WITHIN).await;
    assert_eq!(daemon.containers().len(), 1, "{:?}", daemon.containers());
    assert_eq!(count(&daemon, "backends").await, 1);
    assert_eq!(
        daemon.statuses(&id).await,
        ["scheduled", "loading", "starting", "waiting", "ready"]
    );
}
