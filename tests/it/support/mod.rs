//! Shared helpers for the integration tests: a real `drover serve` child
//! process on its own temp database, free port and instance label, an HTTP
//! client for its API, condition waits, and direct reads of its SQLite file.
//!
//! Each [`Daemon`] owns a temp dir; dropping it kills the process and removes
//! every container labelled with its instance, so parallel tests never touch
//! each other's containers.

#![allow(dead_code)]

mod image;
pub mod private_engine;
pub mod registry;

pub use image::test_image;

use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_drover");

/// Settings for one test daemon; fast by default.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub resync_interval: &'static str,
    pub soft_terminate_grace: &'static str,
    pub startup_timeout: &'static str,
    /// Extra TOML appended to the config file.
    pub extra_toml: String,
    /// Extra environment for the daemon process.
    pub env: Vec<(String, String)>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            resync_interval: "500ms",
            soft_terminate_grace: "2s",
            startup_timeout: "20s",
            extra_toml: String::new(),
            env: Vec::new(),
        }
    }
}

/// A `drover serve` child process with its own database and port.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: DaemonConfig,
    pub port: u16,
    pub child: Option<Child>,
    pub http: reqwest::Client,
    /// The instance id, read from the database once the daemon has served.
    pub instance_id: String,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Daemon {
    /// Starts a daemon with default test settings and waits until it is healthy.
    pub async fn start() -> Daemon {
        Self::start_with(DaemonConfig::default()).await
    }

    pub async fn start_with(config: DaemonConfig) -> Daemon {
        test_image();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut daemon = Daemon {
            dir,
            config,
            port: free_port(),
            child: None,
            http: reqwest::Client::new(),
            instance_id: String::new(),
        };
        daemon.write_config();
        daemon.launch().await;
        daemon
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("drover.db")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("drover.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    pub fn mount_base(&self) -> PathBuf {
        self.dir.path().join("mounts")
    }

    pub fn write_config(&self) {
        let text = format!(
            "db_path = {db:?}\nlisten = \"127.0.0.1:{port}\"\n{extra}\n\n[reconcile]\nresync_interval = {resync:?}\nsoft_terminate_grace = {grace:?}\nstartup_timeout = {startup:?}\n",
            db = self.db_path().display().to_string(),
            port = self.port,
            extra = self.config.extra_toml,
            resync = self.config.resync_interval,
            grace = self.config.soft_terminate_grace,
            startup = self.config.startup_timeout,
        );
        std::fs::write(self.config_path(), text).expect("write config");
    }

    /// Starts the process (again) and waits for `/healthz`.
    pub async fn launch(&mut self) {
        self.launch_with_env(&[]).await;
    }

    /// Starts the process with extra env vars (e.g. `DROVER_CRASH_AT`) and
    /// waits for `/healthz`.
    pub async fn launch_with_env(&mut self, env: &[(&str, &str)]) {
        self.spawn_process(env);
        self.wait_healthy().await;
        if self.instance_id.is_empty() {
            self.instance_id = self
                .query_one("SELECT instance_id FROM instance")
                .await
                .as_str()
                .unwrap()
                .to_string();
        }
    }

    /// Starts the process without waiting for it.
    pub fn spawn_process(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--config"])
            .arg(self.config_path())
            .env("RUST_LOG", "info,drover=debug")
            .env_remove("DROVER_CRASH_AT")
            .env_remove("DROVER_DB")
            .env_remove("DROVER_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        for (k, v) in &self.config.env {
            command.env(k, v);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        self.child = Some(command.spawn().expect("spawn drover"));
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("daemon exited with {status} before serving; log:\n{}", self.log());
                }
            }
            if let Ok(response) = self.http.get(self.url("/healthz")).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "daemon not healthy in 60s; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILLs the daemon (like `kill -9`) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        child.wait().unwrap()
    }

    /// Waits for the process to exit on its own (e.g. at a crash point).
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("daemon running");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "daemon did not exit; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("POST");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(self.url(path)).send().await.expect("GET");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Spawns a backend running `command` (or the image's default httpd) and
    /// returns its id.
    pub async fn spawn(&self, command: Option<&[&str]>) -> String {
        let mut executable = json!({ "image": test_image() });
        if let Some(command) = command {
            executable["command"] = json!(command);
        }
        self.spawn_executable(executable).await
    }

    pub async fn spawn_executable(&self, executable: Value) -> String {
        let (status, body) = self
            .post("/v1/backends", json!({ "executable": executable }))
            .await;
        assert_eq!(status, 201, "spawn failed: {body}");
        body["id"].as_str().unwrap().to_string()
    }

    pub async fn backend(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/backends/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn terminate(&self, id: &str, hard: bool) -> u16 {
        self.post(&format!("/v1/backends/{id}/terminate"), json!({ "hard": hard }))
            .await
            .0
    }

    /// Waits until the backend has `status`; returns the backend object.
    pub async fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let backend = self.backend(id).await;
            if backend["status"] == status {
                return backend;
            }
            assert!(
                Instant::now() < deadline,
                "backend {id} not {status} within {timeout:?}: {backend}\nevents: {:?}\nlog:\n{}",
                self.statuses(id).await,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The backend's event rows through the API, oldest first.
    pub async fn events(&self, id: &str) -> Vec<Value> {
        let (status, body) = self.get(&format!("/v1/backends/{id}/events")).await;
        assert_eq!(status, 200, "{body}");
        body.as_array().unwrap().clone()
    }

    /// Just the statuses of the backend's events, oldest first.
    pub async fn statuses(&self, id: &str) -> Vec<String> {
        self.events(id)
            .await
            .iter()
            .map(|e| e["status"].as_str().unwrap().to_string())
            .collect()
    }

    /// Opens the daemon's database read-only (the daemon may be running).
    pub async fn db(&self) -> sqlx::SqlitePool {
        open_db(&self.db_path()).await
    }

    /// Runs a query and returns its first column of its first row as JSON.
    pub async fn query_one(&self, sql: &str) -> Value {
        query_json(&self.db_path(), sql)
            .await
            .first()
            .and_then(|row| row.as_object().and_then(|o| o.values().next().cloned()))
            .unwrap_or(Value::Null)
    }

    /// Docker's containers of this daemon's instance: `(id, name, state)`.
    pub fn containers(&self) -> Vec<(String, String, String)> {
        instance_containers(&self.instance_id)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if !self.instance_id.is_empty() {
            remove_instance_containers(&self.instance_id);
        }
    }
}

pub async fn open_db(path: &Path) -> sqlx::SqlitePool {
    use sqlx::sqlite::SqliteConnectOptions;
    let options = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(Duration::from_secs(5));
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("open db")
}

/// Runs `sql` on the database and returns every row as a JSON object.
pub async fn query_json(path: &Path, sql: &str) -> Vec<Value> {
    use sqlx::{Column, Row, TypeInfo, ValueRef};
    let pool = open_db(path).await;
    let rows = sqlx::query(sql).fetch_all(&pool).await.expect("query");
    let result = rows
        .iter()
        .map(|row| {
            let mut object = serde_json::Map::new();
            for (i, column) in row.columns().iter().enumerate() {
                let raw = row.try_get_raw(i).unwrap();
                let value = if raw.is_null() {
                    Value::Null
                } else {
                    match raw.type_info().name() {
                        "INTEGER" => json!(row.get::<i64, _>(i)),
                        "REAL" => json!(row.get::<f64, _>(i)),
                        _ => json!(row.get::<String, _>(i)),
                    }
                };
                object.insert(column.name().to_string(), value);
            }
            Value::Object(object)
        })
        .collect();
    pool.close().await;
    result
}

/// Waits for `condition` to hold, polling every 25 ms, or panics with `what`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs the docker CLI and returns its trimmed stdout, panicking on failure.
pub fn docker(args: &[&str]) -> String {
    let output = Command::new("docker").args(args).output().expect("run docker");
    assert!(
        output.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Like [`docker`], but returns `None` instead of panicking on failure.
pub fn try_docker(args: &[&str]) -> Option<String> {
    let output = Command::new("docker").args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

pub fn instance_containers(instance_id: &str) -> Vec<(String, String, String)> {
    let filter = format!("label=dev.drover.instance={instance_id}");
    docker(&["ps", "-a", "--no-trunc", "--filter", &filter, "--format", "{{.ID}} {{.Names}} {{.State}}"])
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            Some((
                parts.next()?.to_string(),
                parts.next()?.to_string(),
                parts.next()?.to_string(),
            ))
        })
        .collect()
}

pub fn remove_instance_containers(instance_id: &str) {
    let ids: Vec<String> = instance_containers(instance_id)
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    if !ids.is_empty() {
        let mut args = vec!["rm", "-f"];
        args.extend(ids.iter().map(String::as_str));
        let _ = try_docker(&args);
    }
}

impl Daemon {
    /// Like [`Daemon::start_with`], in a temp dir the caller made (e.g. one
    /// on a small tmpfs, to fill the database's disk).
    pub async fn start_in(dir: tempfile::TempDir, config: DaemonConfig) -> Daemon {
        test_image();
        let mut daemon = Daemon {
            dir,
            config,
            port: free_port(),
            child: None,
            http: reqwest::Client::new(),
            instance_id: String::new(),
        };
        daemon.write_config();
        daemon.launch().await;
        daemon
    }
}
