//! The `drover` command line run as a process: the client commands (`spawn`,
//! `ls`, `status`, `terminate`, `history`, as tables and with `--json`)
//! against a test daemon through `--api`, their errors, and `drover serve`
//! failing fast with a one-line error on an unreachable Docker engine or an
//! unknown config key.

use crate::support::*;
use serde_json::Value;
use std::time::Duration;

const READY_WITHIN: Duration = Duration::from_secs(90);

struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "success={}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.success, self.stdout, self.stderr
        )
    }
}

/// Runs the `drover` binary with `args` and `env`, without the caller's `DROVER_*` settings.
async fn run(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(args)
        .env_remove("DROVER_API")
        .env_remove("DROVER_API_TOKEN")
        .env_remove("DROVER_CONFIG")
        .env_remove("DROVER_DB")
        .env_remove("DROVER_LISTEN")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .unwrap_or_else(|_| panic!("drover {args:?} did not finish in 30s"))
        .expect("run drover");
    Run {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs a client command against `daemon`'s API; it must succeed.
async fn client(daemon: &Daemon, args: &[&str]) -> String {
    let outcome = client_run(daemon, args).await;
    assert!(outcome.success, "drover {args:?} failed: {outcome:?}");
    outcome.stdout
}

async fn client_run(daemon: &Daemon, args: &[&str]) -> Run {
    let api = daemon.url("");
    let mut full = vec!["--api", api.as_str()];
    full.extend_from_slice(args);
    run(&full, &[]).await
}

/// The line of a table whose first column is `first`.
fn table_row<'a>(table: &'a str, first: &str) -> Option<Vec<&'a str>> {
    table
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&first))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_prints_the_id_and_sends_image_id_env_pull_policy_and_command() {
    let daemon = Daemon::start().await;
    let id = format!("ba-cli{}", free_port());

    let printed = client(
        &daemon,
        &[
            "spawn",
            "--image",
            test_image(),
            "--id",
            &id,
            "--env",
            "GREETING=hi",
            "--env",
            "EQ=a=b",
            "--pull-policy",
            "Never",
            "--",
            "sh",
            "-c",
            "httpd -f -p $PORT -h /www",
        ],
    )
    .await;

    assert_eq!(printed, format!("{id}\n"));
    let backend = daemon.wait_status(&id, "ready", READY_WITHIN).await;
    let executable = &backend["executable"];
    assert_eq!(executable["image"], test_image());
    assert_eq!(executable["pull_policy"], "Never");
    assert_eq!(
        executable["env"],
        serde_json::json!({"GREETING": "hi", "EQ": "a=b"})
    );
    assert_eq!(
        executable["command"],
        serde_json::json!(["sh", "-c", "httpd -f -p $PORT -h /www"])
    );

    // Without --id, a fresh id is made and printed.
    let printed = client(&daemon, &["spawn", "--image", test_image()]).await;
    let fresh = printed.trim_end();
    assert!(
        fresh.starts_with("ba-") && printed.lines().count() == 1,
        "{printed:?}"
    );
    assert_eq!(daemon.backend(fresh).await["id"], fresh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_lists_live_backends_as_a_table_and_all_of_them_with_all_or_as_json() {
    let daemon = Daemon::start().await;
    let live = daemon.spawn(None).await;
    let ended = daemon.spawn(Some(&["sh", "-c", "exit 3"])).await;
    let ready = daemon.wait_status(&live, "ready", READY_WITHIN).await;
    daemon.wait_status(&ended, "terminated", READY_WITHIN).await;

    let table = client(&daemon, &["ls"]).await;
    let header = table.lines().next().unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["ID", "STATUS", "ADDRESS", "EXIT", "IMAGE", "CREATED"]
    );
    let row = table_row(&table, &live).unwrap_or_else(|| panic!("{live} not listed:\n{table}"));
    assert_eq!(row[1], "ready");
    assert_eq!(row[2], ready["address"].as_str().unwrap());
    assert!(
        table_row(&table, &ended).is_none(),
        "terminated listed without --all:\n{table}"
    );
    let all = client(&daemon, &["ls", "--all"]).await;
    let row = table_row(&all, &ended).unwrap_or_else(|| panic!("{ended} not listed:\n{all}"));
    assert_eq!(&row[1..3], ["terminated", "3"]);

    let json: Value = serde_json::from_str(&client(&daemon, &["ls", "--json"]).await).unwrap();
    let ids: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [live.as_str()]);
    assert_eq!(json[0]["status"], "ready");
    let json: Value =
        serde_json::from_str(&client(&daemon, &["ls", "--all", "--json"]).await).unwrap();
    let ids: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [live.as_str(), ended.as_str()]);
    assert_eq!(json[1]["exit_code"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_one_backend_as_fields_and_as_the_api_object_with_json() {
    let daemon = Daemon::start().await;
    let id = daemon.spawn(None).await;
    let ready = daemon.wait_status(&id, "ready", READY_WITHIN).await;

    let text = client(&daemon, &["status", &id]).await;
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name).filter(|rest| rest.starts_with(' ')))
            .map(|rest| rest.trim().to_string())
            .unwrap_or_else(|| panic!("no {name:?} in:\n{text}"))
    };
    assert_eq!(field("id"), id);
    assert_eq!(field("status"), "ready");
    assert_eq!(field("desired"), "running");
    assert_eq!(field("image"), test_image());
    assert_eq!(field("address"), ready["address"].as_str().unwrap());
    assert_eq!(field("container"), ready["container_id"].as_str().unwrap());

    let json: Value =
        serde_json::from_str(&client(&daemon, &["status", &id, "--json"]).await).unwrap();
    assert_eq!(json, daemon.backend(&id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_ends_a_backend_softly_or_hard_and_says_when_it_already_ended() {
    let daemon = Daemon::start_with(DaemonConfig {
        soft_terminate_grace: "1s",
        ..DaemonConfig::default()
    })
    .await;
    let soft = daemon.spawn(None).await;
    let hard = daemon.spawn(None).await;
    daemon.wait_status(&soft, "ready", READY_WITHIN).await;
    daemon.wait_status(&hard, "ready", READY_WITHIN).await;

    assert_eq!(
        client(&daemon, &["terminate", &soft]).await,
        format!("{soft} terminating (soft)\n")
    );
    assert_eq!(
        client(&daemon, &["terminate", &hard, "--hard"]).await,
        format!("{hard} terminating (hard)\n")
    );
    let soft_done = daemon.wait_status(&soft, "terminated", READY_WITHIN).await;
    let hard_done = daemon.wait_status(&hard, "terminated", READY_WITHIN).await;

    assert_eq!(soft_done["state"]["termination"], "soft");
    assert_eq!(hard_done["state"]["termination"], "hard");
    assert!(daemon
        .statuses(&hard)
        .await
        .contains(&"hard-terminating".to_string()));
    assert!(!daemon
        .statuses(&soft)
        .await
        .contains(&"hard-terminating".to_string()));
    assert_eq!(
        client(&daemon, &["terminate", &soft]).await,
        format!("{soft} already terminated\n")
    );
    assert_eq!(
        client(&daemon, &["terminate", &hard, "--hard"]).await,
        format!("{hard} already terminated\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_prints_every_transition_as_a_table_and_the_events_with_json() {
    let daemon = Daemon::start().await;
    let id = daemon.spawn(None).await;
    let ready = daemon.wait_status(&id, "ready", READY_WITHIN).await;
    daemon.terminate(&id, true).await;
    daemon.wait_status(&id, "terminated", READY_WITHIN).await;
    let expected = [
        "scheduled",
        "loading",
        "starting",
        "waiting",
        "ready",
        "hard-terminating",
        "terminated",
    ];

    let table = client(&daemon, &["history", &id]).await;
    let mut lines = table.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["TIME", "STATUS", "SOURCE", "DETAIL"]
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r[1]).collect();
    assert_eq!(statuses, expected, "{table}");
    assert_eq!(
        rows[3][3],
        ready["address"].as_str().unwrap(),
        "waiting shows its address:\n{table}"
    );
    assert!(
        rows[6].contains(&"exit=137") && rows[6].contains(&"reason=external"),
        "{table}"
    );

    let json: Value =
        serde_json::from_str(&client(&daemon, &["history", &id, "--json"]).await).unwrap();
    assert_eq!(json, Value::Array(daemon.events(&id).await));
    let statuses: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_fail_with_the_apis_message_and_a_non_zero_exit() {
    let daemon = Daemon::start().await;

    for args in [
        vec!["status", "ba-nosuchbackend"],
        vec!["history", "ba-nosuchbackend"],
        vec!["terminate", "ba-nosuchbackend"],
    ] {
        let outcome = client_run(&daemon, &args).await;
        assert!(!outcome.success, "{args:?}: {outcome:?}");
        assert!(
            outcome.stderr.contains("no backend ba-nosuchbackend"),
            "{args:?}: {outcome:?}"
        );
        assert!(outcome.stderr.contains("404"), "{args:?}: {outcome:?}");
    }
    let outcome = client_run(&daemon, &["spawn", "--image", ""]).await;
    assert!(!outcome.success, "{outcome:?}");
    assert!(outcome.stderr.contains("executable.image"), "{outcome:?}");
    let outcome = client_run(
        &daemon,
        &[
            "spawn",
            "--image",
            test_image(),
            "--pull-policy",
            "Sometimes",
        ],
    )
    .await;
    assert!(!outcome.success, "{outcome:?}");
    assert!(outcome.stderr.contains("pull_policy"), "{outcome:?}");
    assert_eq!(daemon.query_one("SELECT count(*) FROM backends").await, 0);

    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let outcome = run(&["--api", &nowhere, "ls"], &[]).await;
    assert!(!outcome.success, "{outcome:?}");
    assert!(
        outcome.stderr.contains("cannot reach the drover API"),
        "{outcome:?}"
    );
}

/// The non-empty lines of a process's stderr.
fn lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_docker_unreachable_fails_with_one_line_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("drover.db");
    let listen = format!("127.0.0.1:{}", free_port());

    let outcome = run(
        &["serve", "--db", db.to_str().unwrap(), "--listen", &listen],
        &[("DOCKER_HOST", "unix:///nonexistent.sock")],
    )
    .await;

    assert!(!outcome.success, "{outcome:?}");
    let lines = lines(&outcome.stderr);
    assert_eq!(lines.len(), 1, "{outcome:?}");
    assert!(lines[0].contains("unix:///nonexistent.sock"), "{outcome:?}");
    assert!(lines[0].contains("docker"), "{outcome:?}");
    assert!(
        std::net::TcpStream::connect(&listen).is_err(),
        "nothing listens"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_an_unknown_config_key_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("drover.db");
    for (key, toml) in [
        ("colour", "colour = \"blue\"\n".to_string()),
        (
            "resync_intervall",
            "[reconcile]\nresync_intervall = \"1s\"\n".to_string(),
        ),
    ] {
        let config = dir.path().join("drover.toml");
        std::fs::write(
            &config,
            format!("db_path = {:?}\n{toml}", db.display().to_string()),
        )
        .unwrap();

        let outcome = run(&["serve", "--config", config.to_str().unwrap()], &[]).await;

        assert!(!outcome.success, "{key}: {outcome:?}");
        let lines = lines(&outcome.stderr);
        assert_eq!(lines.len(), 1, "{key}: {outcome:?}");
        assert!(lines[0].contains(key), "{key}: {outcome:?}");
        assert!(
            lines[0].contains("drover.toml"),
            "the file is named: {outcome:?}"
        );
        assert!(!db.exists(), "{key}: nothing was started");
    }
}
