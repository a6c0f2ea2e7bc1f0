//! What drover promises a hostile tenant or network: mounts confined to the
//! mount base (no `..`, no absolute path, no symlink escape; a refused mount
//! creates nothing), named networks honoured, the bearer token on every
//! endpoint but `/healthz` (config key or `DROVER_API_TOKEN`, sent by the
//! CLI), a 1 MiB body limit, no token in the logs, and a database from a
//! newer schema refused at start.

use crate::support::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

const READY_WITHIN: Duration = Duration::from_secs(90);
const TOKEN: &str = "drover-test-token-6c1f0a9e";

async fn count(daemon: &Daemon, table: &str) -> i64 {
    daemon
        .query_one(&format!("SELECT count(*) FROM {table}"))
        .await
        .as_i64()
        .unwrap()
}

/// A daemon whose mount base is `mounts/` (not yet created) in a temp dir
/// that the caller keeps for the daemon's lifetime.
async fn daemon_with_mounts() -> (Daemon, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("mounts");
    let daemon = Daemon::start_with(DaemonConfig {
        extra_toml: format!("[docker]\nmount_base = {:?}\n", base.display().to_string()),
        ..DaemonConfig::default()
    })
    .await;
    (daemon, dir, base)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_that_leave_the_base_are_400_and_create_nothing() {
    let (daemon, _dir, base) = daemon_with_mounts().await;
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(&base).unwrap();
    // A symlink inside the base (as a backend could make in its own folder) pointing out.
    std::os::unix::fs::symlink(outside.path(), base.join("escape")).unwrap();
    let cases = [
        (
            json!(true),
            "executable.mount: true needs a key to name the folder",
        ),
        (json!("../x"), "executable.mount: path may not contain '..'"),
        (
            json!("a/../../x"),
            "executable.mount: path may not contain '..'",
        ),
        (
            json!("/etc/x"),
            "executable.mount: path must be relative to the mount base",
        ),
        (
            json!("."),
            "executable.mount: path must name a folder under the mount base, not the base itself",
        ),
        (
            json!("escape/x"),
            "executable.mount: escape/x resolves outside the mount base",
        ),
        (
            json!("escape"),
            "executable.mount: escape resolves outside the mount base",
        ),
    ];

    for (mount, expected) in cases {
        let (status, body) = daemon
            .post(
                "/v1/backends",
                json!({"executable": {"image": test_image(), "mount": mount}}),
            )
            .await;
        assert_eq!(status, 400, "{mount}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.starts_with(expected), "{mount}: {error}");
    }

    assert_eq!(
        entries(outside.path()),
        Vec::<String>::new(),
        "nothing created outside"
    );
    assert_eq!(entries(&base), ["escape"], "nothing created inside");
    assert_eq!(count(&daemon, "backends").await, 0);
    assert!(daemon.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relative_mount_is_the_backends_plane_data_folder_on_the_host() {
    let (daemon, _dir, base) = daemon_with_mounts().await;
    let id = daemon
        .spawn_executable(json!({
            "image": test_image(),
            "mount": "sessions/one",
            "command": ["sh", "-c", "echo written by $SESSION_BACKEND_ID > /plane-data/note && exec httpd -f -p $PORT -h /www"]
        }))
        .await;
    let ready = daemon.wait_status(&id, "ready", READY_WITHIN).await;

    let folder = base.join("sessions/one");
    assert_eq!(
        std::fs::read_to_string(folder.join("note")).unwrap(),
        format!("written by {id}\n")
    );
    let mounts: Value = serde_json::from_str(&docker(&[
        "inspect",
        "--format",
        "{{json .Mounts}}",
        ready["container_id"].as_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(mounts.as_array().unwrap().len(), 1, "{mounts}");
    assert_eq!(mounts[0]["Destination"], "/plane-data");
    assert_eq!(
        mounts[0]["Source"],
        folder.canonicalize().unwrap().display().to_string()
    );
}

/// A Docker network made by the test, removed when dropped (after the
/// daemon that used it, so no container is attached any more).
struct Network(String);

impl Drop for Network {
    fn drop(&mut self) {
        let _ = try_docker(&["network", "rm", &self.0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_joins_its_named_network_and_is_reachable_on_it() {
    let network = Network(format!("drover-test-net-{}", free_port()));
    docker(&["network", "create", &network.0]);
    let daemon = Daemon::start().await;

    let id = daemon
        .spawn_executable(json!({"image": test_image(), "network_name": network.0}))
        .await;
    let ready = daemon.wait_status(&id, "ready", READY_WITHIN).await;

    let networks: Value = serde_json::from_str(&docker(&[
        "inspect",
        "--format",
        "{{json .NetworkSettings.Networks}}",
        ready["container_id"].as_str().unwrap(),
    ]))
    .unwrap();
    let attached: Vec<&String> = networks.as_object().unwrap().keys().collect();
    assert_eq!(attached, [&network.0]);
    let ip = networks[&network.0]["IPAddress"]
        .as_str()
        .unwrap()
        .to_string();
    // A neighbour on the same network reaches the backend by its address there.
    let page = docker(&[
        "run",
        "--rm",
        "--network",
        &network.0,
        test_image(),
        // busybox's `wget -T` crashes in this static build; `timeout` bounds it instead.
        "timeout",
        "10",
        "wget",
        "-q",
        "-O",
        "-",
        &format!("http://{ip}:8080/"),
    ]);
    assert_eq!(page, "hello from drover-test");
}

/// Sends `method path` with `authorization` (if any); the status only.
async fn status_of(daemon: &Daemon, method: &str, path: &str, authorization: Option<&str>) -> u16 {
    // A client of its own: never the daemon's, which a test may give the token.
    let mut request = reqwest::Client::new()
        .request(method.parse().unwrap(), daemon.url(path))
        .timeout(Duration::from_secs(10));
    if method == "POST" {
        request = request
            .header("content-type", "application/json")
            .body(json!({"executable": {"image": test_image()}}).to_string());
    }
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request.send().await.expect("request").status().as_u16()
}

/// An HTTP client that sends the test token with every request.
fn client_with_token() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

const ENDPOINTS: &[(&str, &str)] = &[
    ("GET", "/v1/backends"),
    ("POST", "/v1/backends"),
    ("GET", "/v1/backends/ba-nosuch"),
    ("POST", "/v1/backends/ba-nosuch/terminate"),
    ("GET", "/v1/backends/ba-nosuch/events"),
    ("GET", "/v1/backends/ba-nosuch/logs"),
    ("GET", "/v1/backends/ba-nosuch/metrics"),
    ("GET", "/v1/events"),
    ("GET", "/metrics"),
    ("POST", "/v1/prune"),
    ("GET", "/v1/prune-runs"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_every_endpoint_but_healthz_answers_401_without_it() {
    let daemon = Daemon::start_with(DaemonConfig {
        extra_toml: format!("api_token = {TOKEN:?}"),
        ..DaemonConfig::default()
    })
    .await;
    let wrong = [
        None,
        Some("Bearer".to_string()),
        Some("Bearer ".to_string()),
        Some("Bearer wrong".to_string()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_string()),
    ];

    for (method, path) in ENDPOINTS {
        for authorization in &wrong {
            let status = status_of(&daemon, method, path, authorization.as_deref()).await;
            assert_eq!(status, 401, "{method} {path} with {authorization:?}");
        }
    }
    let (status, body) = daemon
        .post(
            "/v1/backends",
            json!({"executable": {"image": test_image()}}),
        )
        .await;
    assert_eq!(
        (status, body),
        (
            401,
            json!({"error": "unauthorized: missing or wrong bearer token"})
        )
    );
    let response = daemon
        .http
        .get(daemon.url("/v1/backends"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_eq!(
        count(&daemon, "backends").await,
        0,
        "a refused spawn wrote nothing"
    );

    for (method, path) in ENDPOINTS {
        for scheme in ["Bearer", "bearer"] {
            let status = status_of(&daemon, method, path, Some(&format!("{scheme} {TOKEN}"))).await;
            assert_ne!(status, 401, "{method} {path} with the token");
        }
    }
    assert_eq!(status_of(&daemon, "GET", "/healthz", None).await, 200);
    assert!(!daemon.log().contains(TOKEN), "the token is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_from_the_environment_guards_the_api_and_the_cli_sends_it() {
    let mut daemon = Daemon::start_with(DaemonConfig {
        env: vec![("DROVER_API_TOKEN".into(), TOKEN.into())],
        ..DaemonConfig::default()
    })
    .await;
    let cli = |token: Option<&str>, args: &[&str]| {
        let mut command = std::process::Command::new(BIN);
        command
            .arg("--api")
            .arg(daemon.url(""))
            .args(args)
            .env_remove("DROVER_API_TOKEN");
        if let Some(token) = token {
            command.env("DROVER_API_TOKEN", token);
        }
        command.output().unwrap()
    };

    let refused = cli(None, &["ls"]);
    let wrong = cli(Some("nope"), &["ls"]);
    let spawned = cli(
        Some(TOKEN),
        &["spawn", "--image", test_image(), "--id", "ba-clitoken"],
    );
    let listed = cli(Some(TOKEN), &["ls", "--json"]);

    for denied in [&refused, &wrong] {
        assert!(!denied.status.success());
        assert_eq!(
            String::from_utf8_lossy(&denied.stderr).trim(),
            "drover: unauthorized: missing or wrong bearer token (HTTP 401)"
        );
    }
    assert!(
        spawned.status.success(),
        "{}",
        String::from_utf8_lossy(&spawned.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&spawned.stdout).trim(),
        "ba-clitoken"
    );
    assert!(listed.status.success());
    let list: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(list[0]["id"], "ba-clitoken");
    assert_eq!(status_of(&daemon, "GET", "/v1/backends", None).await, 401);
    daemon.http = client_with_token();
    daemon
        .wait_status("ba-clitoken", "ready", READY_WITHIN)
        .await;
    assert!(!daemon.log().contains(TOKEN), "the token is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_one_byte_over_one_mib_is_413_and_one_at_the_limit_is_read() {
    let daemon = Daemon::start().await;
    let limit = 1024 * 1024;
    // Valid JSON of exactly `size` bytes: a spawn whose env holds the padding.
    let body_of = |size: usize| {
        let empty = json!({"executable": {"image": test_image(), "env": {"PAD": ""}}}).to_string();
        let body = json!({"executable": {"image": test_image(), "env": {"PAD": "x".repeat(size - empty.len())}}})
            .to_string();
        assert_eq!(body.len(), size);
        body.into_bytes()
    };

    let (at_limit, read) = daemon.post_raw("/v1/backends", body_of(limit)).await;
    let (over, refused) = daemon.post_raw("/v1/backends", body_of(limit + 1)).await;
    let (terminate_over, terminate_refused) = daemon
        .post_raw("/v1/backends/ba-nosuch/terminate", vec![b' '; limit + 1])
        .await;

    assert_eq!(
        at_limit, 400,
        "read, then refused for its size of env: {read}"
    );
    assert!(
        read["error"]
            .as_str()
            .unwrap()
            .starts_with("executable.env: at most 65536 bytes"),
        "{read}"
    );
    for (status, body) in [(over, refused), (terminate_over, terminate_refused)] {
        assert_eq!(
            (status, body),
            (
                413,
                json!({"error": "request body larger than 1048576 bytes"})
            )
        );
    }
    assert_eq!(count(&daemon, "backends").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_refuses_a_database_written_by_a_newer_schema() {
    let mut daemon = Daemon::start().await;
    daemon.stop();
    {
        use sqlx::sqlite::SqliteConnectOptions;
        let pool =
            sqlx::SqlitePool::connect_with(SqliteConnectOptions::new().filename(daemon.db_path()))
                .await
                .unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (20991231000000, 'from the future', 1, x'00', 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let log_before = daemon.log().len();

    daemon.spawn_process(&[]);
    let status = daemon.wait_exit(Duration::from_secs(20)).await;

    assert!(!status.success(), "{status}");
    let log = daemon.log()[log_before..].to_string();
    let expected = format!(
        "database {} was written by a newer drover (schema version 20991231000000 is unknown to this binary); upgrade drover or use another database",
        daemon.db_path().display()
    );
    assert!(log.contains(&expected), "{log}");
}
