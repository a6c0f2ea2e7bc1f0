//! The end-to-end benchmark: drover against the real Docker engine, next to
//! the floor of what Docker itself costs, and the generator of the `e2e`
//! section of `docs/benchmarks.md`.
//!
//! `cargo bench --bench e2e` runs it at full size;
//! `DROVER_BENCH_SCALE=small cargo bench --bench e2e` is a CI-sized run (its
//! document goes to `target/drover-bench/benchmarks.md`, leaving the
//! committed one alone; `DROVER_BENCH_DOC=path` picks another).
//!
//! It builds the release `drover` binary (`cargo build --release`) and the
//! test image (`scripts/test-image`), then runs `drover serve` as child
//! processes, each on its own temp database and so with its own instance
//! label. The "raw floor" is the same container made the shortest way:
//! bollard create + start + inspect for the port + the same HTTP probe, with
//! no store and no reconciler. Every comparison alternates drover and the
//! floor sample by sample in this one process. Only containers this run
//! created are ever removed.

#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/report.rs"]
mod report;

use anyhow::{bail, Context, Result};
use bollard::container::{
    Config as ContainerConfig, CreateContainerOptions, InspectContainerOptions, KillContainerOptions,
    RemoveContainerOptions, StartContainerOptions, StatsOptions,
};
use bollard::models::{HostConfig, PortBinding};
use bollard::system::EventsOptions;
use bollard::Docker;
use drover::model::{
    BackendName, BackendState, BackendStatus, EventSource, ExecutorSpec, Signal, TerminationReason,
};
use drover::store::{Store, Transition};
use futures::StreamExt;
use proxy::Proxy;
use report::{ms, verdict, Stats};
use serde_json::{json, Value};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const IMAGE: &str = "drover-test/busybox:latest";
/// An image that is never present: with pull policy `Never`, drover records
/// such a spawn as terminated without starting anything.
const ABSENT_IMAGE: &str = "drover-bench/absent:none";
const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Labels the raw floor's containers, with this run's id, for cleanup.
const RAW_LABEL: &str = "dev.drover.bench-run";
/// The processes that make up the Docker engine, by `comm` (15 characters at most).
const ENGINE_PROCESSES: &[&str] = &["dockerd", "containerd", "containerd-shim", "docker-proxy"];
/// What the issue measured for Plane 0.5.5's drone with 50 idle backends.
const PLANE_ISSUE_ENGINE_MS_PER_S: f64 = 235.0;

// Targets, from the issue.
const SPAWN_RATIO_TARGET: f64 = 1.10;
const BURST_RATIO_TARGET: f64 = 1.15;
const EXIT_TARGET_MS: f64 = 50.0;
const RESTART_TARGET_MS: f64 = 2_000.0;
const CALLS_PER_PASS_TARGET: f64 = 2.0;
const PLANE_SHARE_TARGET: f64 = 0.10;
const RSS_TARGET_MIB: f64 = 64.0;

/// How big a run is: `full` (the default) or `small` (CI-sized).
#[derive(Clone, Debug)]
struct Scale {
    name: &'static str,
    spawn_pairs: usize,
    burst: usize,
    burst_rounds: usize,
    exit_samples: usize,
    restart_backends: usize,
    idle_small: usize,
    idle_window: Duration,
    api_requests: usize,
    api_concurrency: usize,
    store_creates: usize,
    lifecycles: usize,
    metrics_backends: usize,
}

impl Scale {
    fn from_env() -> Result<Scale> {
        match std::env::var("DROVER_BENCH_SCALE").as_deref() {
            Err(_) | Ok("") | Ok("full") => Ok(Scale {
                name: "full",
                spawn_pairs: 20,
                burst: 50,
                burst_rounds: 4,
                exit_samples: 20,
                restart_backends: 100,
                idle_small: 50,
                idle_window: Duration::from_secs(60),
                api_requests: 1_000,
                api_concurrency: 16,
                store_creates: 1_000,
                lifecycles: 10_000,
                metrics_backends: 100,
            }),
            Ok("small") => Ok(Scale {
                name: "small",
                spawn_pairs: 5,
                burst: 10,
                burst_rounds: 1,
                exit_samples: 5,
                restart_backends: 10,
                idle_small: 5,
                idle_window: Duration::from_secs(5),
                api_requests: 100,
                api_concurrency: 8,
                store_creates: 100,
                lifecycles: 500,
                metrics_backends: 10,
            }),
            Ok(other) => bail!("DROVER_BENCH_SCALE: expected \"full\" or \"small\", got {other:?}"),
        }
    }
}

/// One line of the targets table.
struct Target {
    what: String,
    measured: String,
    required: String,
    met: bool,
}

/// Everything the run produces for the document.
#[derive(Default)]
struct Findings {
    targets: Vec<Target>,
    /// Markdown subsections, in order.
    sections: Vec<String>,
    /// Rows of the Plane comparison table: (work, Plane 0.5.5, drover here).
    plane: Vec<(String, String, String)>,
}

impl Findings {
    fn target(&mut self, what: impl Into<String>, measured: impl Into<String>, required: impl Into<String>, met: bool) {
        let target = Target {
            what: what.into(),
            measured: measured.into(),
            required: required.into(),
            met,
        };
        println!(
            "  target: {} = {} (required {}): {}",
            target.what,
            target.measured,
            target.required,
            if met { "met" } else { "MISSED" }
        );
        self.targets.push(target);
    }
}

fn main() -> Result<()> {
    let scale = Scale::from_env()?;
    let started = Instant::now();
    println!("drover e2e benchmark, scale {} (DROVER_BENCH_SCALE=small for a CI-sized run)", scale.name);
    let machine = report::machine();
    let date = report::now_utc();
    let bin = build_release_binary()?;
    build_test_image()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let findings = runtime.block_on(run(&scale, &bin))?;
    let body = render(&scale, &date, &machine, started.elapsed(), &findings);
    let path = match std::env::var_os("DROVER_BENCH_DOC") {
        Some(path) => PathBuf::from(path),
        None if scale.name == "full" => report::doc_path(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/drover-bench/benchmarks.md"),
    };
    let written = report::write_section_to(&path, "e2e", &body)?;
    println!("wrote {} in {:.0} s", written.display(), started.elapsed().as_secs_f64());
    let missed = findings.targets.iter().filter(|t| !t.met).count();
    println!("{} targets met, {missed} missed", findings.targets.len() - missed);
    Ok(())
}

/// Builds `target/release/drover` and returns its path.
fn build_release_binary() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("building the daemon: cargo build --release --bin drover");
    let output = Command::new(cargo)
        .args(["build", "--release", "--bin", "drover", "--message-format=json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .context("run cargo build --release")?;
    if !output.status.success() {
        bail!("cargo build --release failed");
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "drover")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo build did not report the drover executable")
}

fn build_test_image() -> Result<()> {
    println!("building the test image: scripts/test-image");
    let status = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-image"))
        .status()
        .context("run scripts/test-image")?;
    if !status.success() {
        bail!("scripts/test-image failed");
    }
    Ok(())
}

async fn run(scale: &Scale, bin: &Path) -> Result<Findings> {
    let run_id = format!("{}", std::process::id());
    let _raw_cleanup = RawCleanup(run_id.clone());
    let raw = Raw::connect(&run_id).await?;
    let mut findings = Findings::default();

    // Spawn, burst and exit: a daemon talking to the engine directly.
    {
        let daemon = Daemon::start("spawn", bin, None).await?;
        spawn_one_at_a_time(scale, &daemon, &raw, &mut findings).await?;
        burst(scale, &daemon, &raw, &mut findings).await?;
        exit_to_record(scale, &daemon, &raw, &mut findings).await?;
    }

    // Restart and idle cost: a daemon whose Docker calls go through a counting proxy.
    {
        let dir = tempfile::tempdir()?;
        let proxy = Proxy::start(&dir.path().join("docker.sock"), Path::new(DOCKER_SOCKET))?;
        let mut daemon = Daemon::start("idle", bin, Some(proxy.docker_host())).await?;
        restart_to_converged(scale, &mut daemon, &raw, &proxy, &mut findings).await?;
        idle_cost(scale, &mut daemon, &raw, &proxy, &mut findings).await?;
    }

    // The store: through the API, then in-process.
    {
        let daemon = Daemon::start("store", bin, None).await?;
        api_accept_rate(scale, &daemon, &mut findings).await?;
    }
    store_in_process(scale, &mut findings).await?;
    Ok(findings)
}

// ---------------------------------------------------------------------------
// The drover daemon, as a child process.

struct Daemon {
    name: &'static str,
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    docker_host: Option<String>,
    child: Option<Child>,
    instance_id: String,
    http: reqwest::Client,
    db: Option<SqlitePool>,
}

impl Daemon {
    /// Starts `drover serve` with the default configuration (its own database
    /// and port) and waits until it answers `/healthz`.
    async fn start(name: &'static str, bin: &Path, docker_host: Option<String>) -> Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = format!(
            "db_path = {:?}\nlisten = \"127.0.0.1:{port}\"\n",
            dir.path().join("drover.db").display().to_string()
        );
        std::fs::write(dir.path().join("drover.toml"), config)?;
        let mut daemon = Daemon {
            name,
            dir,
            bin: bin.to_path_buf(),
            port,
            docker_host,
            child: None,
            instance_id: String::new(),
            http: reqwest::Client::new(),
            db: None,
        };
        daemon.spawn_process()?;
        daemon.wait_healthy(Duration::from_secs(60)).await?;
        let db = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(daemon.dir.path().join("drover.db"))
                    .read_only(true)
                    .busy_timeout(Duration::from_secs(5)),
            )
            .await?;
        daemon.instance_id = sqlx::query_scalar("SELECT instance_id FROM instance")
            .fetch_one(&db)
            .await?;
        daemon.db = Some(db);
        println!("daemon {name}: pid {}, instance {}", daemon.pid(), daemon.instance_id);
        Ok(daemon)
    }

    /// Adds `toml` to the configuration the next launch reads.
    fn append_config(&self, toml: &str) -> Result<()> {
        let path = self.dir.path().join("drover.toml");
        let mut config = std::fs::read_to_string(&path)?;
        config.push_str(toml);
        std::fs::write(path, config)?;
        Ok(())
    }

    fn spawn_process(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))?;
        let mut command = Command::new(&self.bin);
        command
            .args(["serve", "--config"])
            .arg(self.dir.path().join("drover.toml"))
            .env("RUST_LOG", "warn")
            .env_remove("DROVER_DB")
            .env_remove("DROVER_LISTEN")
            .env_remove("DROVER_API_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        match &self.docker_host {
            Some(host) => command.env("DOCKER_HOST", host),
            None => command.env_remove("DOCKER_HOST"),
        };
        self.child = Some(command.spawn().context("spawn drover serve")?);
        Ok(())
    }

    async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                bail!("daemon {} exited with {status}; log:\n{}", self.name, self.log());
            }
            if let Ok(response) = self.http.get(self.url("/healthz")).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("daemon {} not healthy in {timeout:?}; log:\n{}", self.name, self.log());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn db(&self) -> &SqlitePool {
        self.db.as_ref().expect("database open")
    }

    /// `kill -9`, and reap.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for the clean exit (containers are left running).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let _ = child.wait();
        }
    }

    /// POSTs a spawn and returns the new backend's id.
    async fn spawn(&self, executable: Value) -> Result<String> {
        let response = self
            .http
            .post(self.url("/v1/backends"))
            .json(&json!({ "executable": executable }))
            .send()
            .await?;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status != 201 {
            bail!("spawn answered {status}: {body}");
        }
        Ok(body["id"].as_str().context("spawn answer without id")?.to_string())
    }

    async fn hard_terminate(&self, id: &str) -> Result<()> {
        let response = self
            .http
            .post(self.url(&format!("/v1/backends/{id}/terminate")))
            .json(&json!({ "hard": true }))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("terminate {id} answered {}", response.status());
        }
        Ok(())
    }

    /// How many of `ids` have `status`, read from the database.
    async fn count_status(&self, ids: &[String], status: &str) -> Result<usize> {
        let list = ids.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(",");
        let sql = format!("SELECT COUNT(*) FROM backends WHERE status = ? AND id IN ({list})");
        let count: i64 = sqlx::query_scalar(&sql).bind(status).fetch_one(self.db()).await?;
        Ok(count as usize)
    }

    /// Polls the database until all of `ids` have `status`: every millisecond
    /// for one backend, every 5 ms for more (a burst lasts seconds, and the
    /// polling should not load the machine it measures).
    async fn wait_all(&self, ids: &[String], status: &str, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        let every = Duration::from_millis(if ids.len() == 1 { 1 } else { 5 });
        loop {
            if self.count_status(ids, status).await? == ids.len() {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!(
                    "daemon {}: {} of {} backends {status} after {timeout:?}; log tail:\n{}",
                    self.name,
                    self.count_status(ids, status).await?,
                    ids.len(),
                    tail(&self.log(), 40)
                );
            }
            tokio::time::sleep(every).await;
        }
    }

    /// The backend's transitions: (status, timestamp in ms).
    async fn history(&self, id: &str) -> Result<Vec<(String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT status, timestamp_ms FROM backend_events WHERE backend_id = ? ORDER BY event_id",
        )
        .bind(id)
        .fetch_all(self.db())
        .await?)
    }

    /// `(id, container id)` of every ready backend.
    async fn ready_containers(&self) -> Result<BTreeMap<String, String>> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, container_id FROM backends WHERE status = 'ready' AND container_id IS NOT NULL",
        )
        .fetch_all(self.db())
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// One counter of `/metrics`, summed over its labels; `None` when absent.
    async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.http.get(self.url("/metrics")).send().await.ok()?.text().await.ok()?;
        let mut total = None;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else { continue };
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                continue;
            }
            if let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                *total.get_or_insert(0.0) += value;
            }
        }
        total
    }

    /// Spawns `n` backends of the test image at once and waits until all are ready.
    async fn spawn_ready(&self, n: usize) -> Result<Vec<String>> {
        let spawns = (0..n).map(|_| self.spawn(json!({ "image": IMAGE })));
        let ids = futures::future::try_join_all(spawns).await?;
        self.wait_all(&ids, "ready", Duration::from_secs(300)).await?;
        Ok(ids)
    }

    async fn container_ids(&self, ids: &[String]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for id in ids {
            let container: Option<String> =
                sqlx::query_scalar("SELECT container_id FROM backends WHERE id = ?")
                    .bind(id)
                    .fetch_one(self.db())
                    .await?;
            out.extend(container);
        }
        Ok(out)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if !self.instance_id.is_empty() {
            remove_labelled(&format!("dev.drover.instance={}", self.instance_id));
        }
    }
}

/// Removes every container carrying `label` (`key=value`), by the docker CLI.
fn remove_labelled(label: &str) {
    let listed = Command::new("docker")
        .args(["ps", "-aq", "--no-trunc", "--filter", &format!("label={label}")])
        .output();
    let Ok(listed) = listed else { return };
    let ids: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    for chunk in ids.chunks(50) {
        let _ = Command::new("docker")
            .arg("rm")
            .arg("-f")
            .args(chunk)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes the raw floor's leftover containers when the run ends, however it ends.
struct RawCleanup(String);

impl Drop for RawCleanup {
    fn drop(&mut self) {
        remove_labelled(&format!("{RAW_LABEL}={}", self.0));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// The raw floor: bollard, no store, no reconciler.

struct Raw {
    docker: Docker,
    run_id: String,
    counter: AtomicUsize,
}

/// Where one raw spawn's time went, in ms.
#[derive(Clone, Copy, Debug, Default)]
struct RawTimes {
    total: f64,
    create: f64,
    start: f64,
    inspect: f64,
    probe: f64,
}

impl Raw {
    async fn connect(run_id: &str) -> Result<Raw> {
        let docker = Docker::connect_with_socket_defaults()?.negotiate_version().await?;
        Ok(Raw {
            docker,
            run_id: run_id.to_string(),
            counter: AtomicUsize::new(0),
        })
    }

    /// Create + start + inspect (the port) + HEAD probe every millisecond
    /// until the first HTTP answer: the floor of a spawn. Returns the container id.
    async fn spawn(&self) -> Result<(String, RawTimes)> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let backend = BackendName::new_random();
        let name = format!("drover-bench-raw-{}-{n}", self.run_id);
        let port_key = "8080/tcp".to_string();
        let config = ContainerConfig {
            image: Some(IMAGE.to_string()),
            env: Some(vec!["PORT=8080".to_string(), format!("SESSION_BACKEND_ID={backend}")]),
            labels: Some(HashMap::from([
                (RAW_LABEL.to_string(), self.run_id.clone()),
                ("dev.drover.bench-backend".to_string(), backend.to_string()),
            ])),
            exposed_ports: Some(HashMap::from([(port_key.clone(), HashMap::new())])),
            host_config: Some(HostConfig {
                port_bindings: Some(HashMap::from([(
                    port_key.clone(),
                    Some(vec![PortBinding {
                        host_ip: None,
                        host_port: None,
                    }]),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let t0 = Instant::now();
        let created = self
            .docker
            .create_container(Some(CreateContainerOptions { name, platform: None }), config)
            .await?;
        let t_create = Instant::now();
        self.docker
            .start_container(&created.id, None::<StartContainerOptions<String>>)
            .await?;
        let t_start = Instant::now();
        let inspected = self
            .docker
            .inspect_container(&created.id, None::<InspectContainerOptions>)
            .await?;
        let port: u16 = inspected
            .network_settings
            .and_then(|n| n.ports)
            .and_then(|p| p.get(&port_key).cloned().flatten())
            .and_then(|b| b.into_iter().find_map(|b| b.host_port?.parse().ok()))
            .context("raw container has no published port")?;
        let t_inspect = Instant::now();
        let target = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !drover::executor::probe_http(target).await {
            if Instant::now() > deadline {
                bail!("raw container {} never answered HTTP", created.id);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let t_ready = Instant::now();
        Ok((
            created.id,
            RawTimes {
                total: millis(t_ready - t0),
                create: millis(t_create - t0),
                start: millis(t_start - t_create),
                inspect: millis(t_inspect - t_start),
                probe: millis(t_ready - t_inspect),
            },
        ))
    }

    async fn remove(&self, container: &str) {
        let _ = self
            .docker
            .remove_container(
                container,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await;
    }

    async fn remove_all(&self, containers: &[String]) {
        futures::future::join_all(containers.iter().map(|c| self.remove(c))).await;
    }

    /// `State.StartedAt` of a container.
    async fn started_at(&self, container: &str) -> Result<String> {
        let inspected = self
            .docker
            .inspect_container(container, None::<InspectContainerOptions>)
            .await?;
        Ok(inspected.state.and_then(|s| s.started_at).unwrap_or_default())
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------
// Spawn to ready, one at a time.

async fn spawn_one_at_a_time(scale: &Scale, daemon: &Daemon, raw: &Raw, findings: &mut Findings) -> Result<()> {
    println!("spawn to ready, one at a time: {} pairs", scale.spawn_pairs);
    // One unmeasured spawn each, so that first-use costs (image cache, connection pools) are paid.
    let id = daemon.spawn(json!({ "image": IMAGE })).await?;
    daemon.wait_all(&[id.clone()], "ready", Duration::from_secs(60)).await?;
    let containers = daemon.container_ids(&[id.clone()]).await?;
    raw.remove_all(&containers).await;
    daemon.wait_all(&[id], "terminated", Duration::from_secs(60)).await?;
    let (warm, _) = raw.spawn().await?;
    raw.remove(&warm).await;

    let mut drover_ms = Vec::new();
    let mut raw_ms = Vec::new();
    let mut phases: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut raw_phases: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for pair in 0..scale.spawn_pairs {
        // Alternate which side goes first, so neither always runs on a warmer engine.
        let order = if pair % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            if side == 0 {
                let (id, total, api, container) = drover_spawn(daemon).await?;
                drover_ms.push(total);
                phases.entry("0. API answer").or_default().push(api);
                add_phases(daemon, &id, &mut phases).await?;
                raw.remove(&container).await;
                daemon.wait_all(&[id], "terminated", Duration::from_secs(60)).await?;
            } else {
                let (container, times) = raw.spawn().await?;
                raw_ms.push(times.total);
                add_raw_phases(&times, &mut raw_phases);
                raw.remove(&container).await;
            }
        }
    }
    let d = Stats::of(&drover_ms);
    let r = Stats::of(&raw_ms);
    let ratio = d.median / r.median;
    println!("  drover {}  raw {}  ratio {ratio:.3}", d.ms(), r.ms());
    findings.target(
        "spawn to ready, one at a time (median ratio to the raw floor)",
        format!("{ratio:.2}× ({} vs {})", ms(d.median), ms(r.median)),
        format!("≤ {SPAWN_RATIO_TARGET:.2}×"),
        ratio <= SPAWN_RATIO_TARGET,
    );
    let mut s = String::new();
    writeln!(s, "### Spawn to ready, one at a time ({} pairs)\n", scale.spawn_pairs)?;
    writeln!(s, "| | median | min | max |\n|---|---|---|---|")?;
    writeln!(s, "| drover: `POST /v1/backends` → `ready` seen in the database | {} | {} | {} |", ms(d.median), ms(d.min), ms(d.max))?;
    writeln!(s, "| raw floor: create + start + inspect + first HTTP answer | {} | {} | {} |", ms(r.median), ms(r.min), ms(r.max))?;
    writeln!(s, "| **ratio of the medians** | **{ratio:.3}×** | | |\n")?;
    writeln!(s, "Where the time goes (medians). drover, from its own history rows (ms resolution): {}. Raw floor: {}.\n",
        phase_list(&phases), phase_list(&raw_phases))?;
    findings.sections.push(s);
    let extra = d.median - r.median;
    findings.plane.push((
        "readiness of a new backend".into(),
        "polls every 100 ms: up to 100 ms (≈ 50 ms on average) after the backend first answers".into(),
        format!("probes 2 ms after start, then backs off (4, 8, … capped at 100 ms); spawn to ready {} over the raw floor (median)", ms(extra)),
    ));
    Ok(())
}

/// Adds a drover backend's phases, from its history rows, to `phases`.
async fn add_phases(daemon: &Daemon, id: &str, phases: &mut BTreeMap<&'static str, Vec<f64>>) -> Result<()> {
    let history = daemon.history(id).await?;
    let at = |status: &str| history.iter().find(|(s, _)| s == status).map(|(_, t)| *t as f64);
    if let (Some(s), Some(st), Some(w), Some(r)) = (at("scheduled"), at("starting"), at("waiting"), at("ready")) {
        phases.entry("1. scheduled → starting").or_default().push(st - s);
        phases.entry("2. starting → waiting (create, start, inspect)").or_default().push(w - st);
        phases.entry("3. waiting → ready (probe)").or_default().push(r - w);
    }
    Ok(())
}

fn add_raw_phases(times: &RawTimes, phases: &mut BTreeMap<&'static str, Vec<f64>>) {
    phases.entry("1. create").or_default().push(times.create);
    phases.entry("2. start").or_default().push(times.start);
    phases.entry("3. inspect").or_default().push(times.inspect);
    phases.entry("4. probe").or_default().push(times.probe);
}

fn phase_list(phases: &BTreeMap<&str, Vec<f64>>) -> String {
    phases
        .iter()
        .map(|(name, values)| format!("{} {}", &name[3..], ms(Stats::of(values).median)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One spawn through drover: (id, ms to ready, ms to the API's answer, container id).
async fn drover_spawn(daemon: &Daemon) -> Result<(String, f64, f64, String)> {
    let t0 = Instant::now();
    let id = daemon.spawn(json!({ "image": IMAGE })).await?;
    let answered = Instant::now();
    let ready = daemon.wait_all(&[id.clone()], "ready", Duration::from_secs(60)).await?;
    let container = daemon.container_ids(&[id.clone()]).await?.pop().context("ready without container")?;
    Ok((id, millis(ready - t0), millis(answered - t0), container))
}

// ---------------------------------------------------------------------------
// Burst.

async fn burst(scale: &Scale, daemon: &Daemon, raw: &Raw, findings: &mut Findings) -> Result<()> {
    println!("burst: {} at once, {} rounds", scale.burst, scale.burst_rounds);
    let mut drover_ms = Vec::new();
    let mut raw_ms = Vec::new();
    let mut phases = BTreeMap::new();
    let mut raw_phases = BTreeMap::new();
    for round in 0..scale.burst_rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            if side == 0 {
                let t0 = Instant::now();
                let ids = daemon.spawn_ready(scale.burst).await?;
                drover_ms.push(millis(t0.elapsed()));
                for id in &ids {
                    add_phases(daemon, id, &mut phases).await?;
                }
                let containers = daemon.container_ids(&ids).await?;
                raw.remove_all(&containers).await;
                daemon.wait_all(&ids, "terminated", Duration::from_secs(120)).await?;
            } else {
                let t0 = Instant::now();
                let spawned =
                    futures::future::try_join_all((0..scale.burst).map(|_| raw.spawn())).await?;
                raw_ms.push(millis(t0.elapsed()));
                for (_, times) in &spawned {
                    add_raw_phases(times, &mut raw_phases);
                }
                let containers: Vec<String> = spawned.into_iter().map(|(c, _)| c).collect();
                raw.remove_all(&containers).await;
            }
            println!("  round {round} side {}: {}", ["drover", "raw"][side],
                ms(*[&drover_ms, &raw_ms][side].last().unwrap()));
        }
    }
    let d = Stats::of(&drover_ms);
    let r = Stats::of(&raw_ms);
    let ratio = d.median / r.median;
    findings.target(
        format!("burst of {} (median ratio to the raw floor)", scale.burst),
        format!("{ratio:.2}× ({} vs {})", ms(d.median), ms(r.median)),
        format!("≤ {BURST_RATIO_TARGET:.2}×"),
        ratio <= BURST_RATIO_TARGET,
    );
    let mut s = String::new();
    writeln!(s, "### Burst: {} spawned at once, until all are ready ({} rounds)\n", scale.burst, scale.burst_rounds)?;
    writeln!(s, "| | median | min | max |\n|---|---|---|---|")?;
    writeln!(s, "| drover: {} concurrent `POST /v1/backends` → all `ready` | {} | {} | {} |", scale.burst, ms(d.median), ms(d.min), ms(d.max))?;
    writeln!(s, "| raw floor: {} concurrent create + start + inspect + probe | {} | {} | {} |", scale.burst, ms(r.median), ms(r.min), ms(r.max))?;
    writeln!(s, "| **ratio of the medians** | **{ratio:.3}×** | | |\n")?;
    writeln!(s, "Per backend, medians over every backend of every round. drover: {}. Raw floor: {}.\n",
        phase_list(&phases), phase_list(&raw_phases))?;
    findings.sections.push(s);
    Ok(())
}

// ---------------------------------------------------------------------------
// Exit to record.

async fn exit_to_record(scale: &Scale, daemon: &Daemon, raw: &Raw, findings: &mut Findings) -> Result<()> {
    println!("exit to record: {} samples", scale.exit_samples);
    let ids = daemon.spawn_ready(scale.exit_samples).await?;
    let containers = daemon.container_ids(&ids).await?;
    // The floor: when Docker's own `die` event reaches a client. And how long
    // an inspect sent at that moment takes to answer (drover inspects each
    // exited container for its exact `FinishedAt`).
    let deaths: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let inspects: Arc<Mutex<Vec<f64>>> = Arc::default();
    let listener = {
        let deaths = deaths.clone();
        let inspects = inspects.clone();
        let docker = raw.docker.clone();
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("event".to_string(), vec!["die".to_string()]),
            ("label".to_string(), vec![format!("dev.drover.instance={}", daemon.instance_id)]),
        ]);
        let mut events = docker.events(Some(EventsOptions::<String> {
            since: None,
            until: None,
            filters,
        }));
        tokio::spawn(async move {
            while let Some(Ok(event)) = events.next().await {
                if let Some(id) = event.actor.and_then(|a| a.id) {
                    deaths.lock().unwrap().entry(id.clone()).or_insert_with(Instant::now);
                    let docker = docker.clone();
                    let inspects = inspects.clone();
                    tokio::spawn(async move {
                        let t = Instant::now();
                        if docker.inspect_container(&id, None::<InspectContainerOptions>).await.is_ok() {
                            inspects.lock().unwrap().push(millis(t.elapsed()));
                        }
                    });
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut record_ms = Vec::new();
    let mut event_ms = Vec::new();
    let mut after_event_ms = Vec::new();
    for (id, container) in ids.iter().zip(&containers) {
        let t0 = Instant::now();
        raw.docker
            .kill_container(container, Some(KillContainerOptions { signal: "SIGKILL" }))
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let row: Option<(String, Option<i64>)> =
                sqlx::query_as("SELECT status, exit_code FROM backends WHERE id = ?")
                    .bind(id)
                    .fetch_optional(daemon.db())
                    .await?;
            if let Some((status, code)) = row {
                if status == "terminated" {
                    if code != Some(137) {
                        bail!("backend {id} recorded exit code {code:?}, expected 137");
                    }
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("exit of {id} not recorded in 30 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let recorded = millis(t0.elapsed());
        record_ms.push(recorded);
        // The event may be read a moment after the row shows up: wait for it briefly.
        let mut died = None;
        for _ in 0..200 {
            died = deaths.lock().unwrap().get(container).copied();
            if died.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(died) = died {
            let event = millis(died.saturating_duration_since(t0));
            event_ms.push(event);
            after_event_ms.push(recorded - event);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    listener.abort();
    raw.remove_all(&containers).await;
    let d = Stats::of(&record_ms);
    let e = Stats::of(&event_ms);
    let a = Stats::of(&after_event_ms);
    let i = Stats::of(&inspects.lock().unwrap());
    findings.target(
        "exit to record (median, `docker kill` → `terminated` row with exit code)",
        ms(d.median),
        format!("≤ {EXIT_TARGET_MS:.0} ms"),
        d.median <= EXIT_TARGET_MS,
    );
    let mut s = String::new();
    writeln!(s, "### Exit to record ({} samples)\n", record_ms.len())?;
    writeln!(s, "| | median | min | max |\n|---|---|---|---|")?;
    writeln!(s, "| drover: `docker kill` (SIGKILL) → `terminated` row with exit code 137 | {} | {} | {} |", ms(d.median), ms(d.min), ms(d.max))?;
    writeln!(s, "| floor: `docker kill` → Docker's `die` event received by a client | {} | {} | {} |", ms(e.median), ms(e.min), ms(e.max))?;
    writeln!(s, "| drover's own part: `die` event received → row committed (per sample; may be below zero when drover read the event first) | {} | {} | {} |", ms(a.median), ms(a.min), ms(a.max))?;
    writeln!(s, "| of which Docker: an inspect of the container sent when its `die` event arrives, until it answers | {} | {} | {} |\n", ms(i.median), ms(i.min), ms(i.max))?;
    findings.sections.push(s);
    findings.plane.push((
        "recording an exit".into(),
        "a per-backend `inspect` on terminate; the exit is kept in memory only".into(),
        format!("exit code from the `die` event, then one inspect for the exact `FinishedAt`; committed to SQLite {} after the kill (median)", ms(d.median)),
    ));
    Ok(())
}

// ---------------------------------------------------------------------------
// Restart to converged.

async fn restart_to_converged(
    scale: &Scale,
    daemon: &mut Daemon,
    raw: &Raw,
    proxy: &Proxy,
    findings: &mut Findings,
) -> Result<()> {
    let n = scale.restart_backends;
    println!("restart to converged: {n} ready backends, kill -9, start again");
    for chunk in 0..n.div_ceil(25) {
        daemon.spawn_ready(25.min(n - chunk * 25)).await?;
    }
    let before = daemon.ready_containers().await?;
    if before.len() != n {
        bail!("expected {n} ready backends, found {}", before.len());
    }
    let mut started_before = HashMap::new();
    for container in before.values() {
        started_before.insert(container.clone(), raw.started_at(container).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    daemon.kill9();
    let t0 = Instant::now();
    daemon.spawn_process()?;
    let mut api_at = None;
    let mut pass_at = None;
    let mut have_metrics = true;
    let deadline = t0 + Duration::from_secs(60);
    while api_at.is_none() || (have_metrics && pass_at.is_none()) {
        if Instant::now() > deadline {
            bail!("not converged 60 s after restart; log tail:\n{}", tail(&daemon.log(), 40));
        }
        if api_at.is_none() {
            if let Ok(response) = daemon.http.get(daemon.url("/v1/backends?live=true")).send().await {
                if let Ok(list) = response.json::<Vec<Value>>().await {
                    let same = list
                        .iter()
                        .filter(|b| {
                            b["status"] == "ready"
                                && b["id"].as_str().and_then(|id| before.get(id)).map(String::as_str)
                                    == b["container_id"].as_str()
                        })
                        .count();
                    if same == n {
                        api_at = Some(Instant::now());
                    }
                }
            }
        }
        if api_at.is_some() && pass_at.is_none() {
            match daemon.metric("drover_reconcile_passes_total").await {
                Some(passes) if passes >= 1.0 => pass_at = Some(Instant::now()),
                Some(_) => {}
                None => have_metrics = false,
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let api_at = api_at.unwrap();
    // Without `/metrics`, the reconciler's first comparison with Docker is
    // seen as the answer to its first list call.
    let list_answered = proxy
        .log
        .between(t0, None)
        .into_iter()
        .find(|c| c.endpoint == "GET /containers/json")
        .and_then(|c| c.answered);
    let converged = [Some(api_at), pass_at, list_answered]
        .into_iter()
        .flatten()
        .max()
        .unwrap();
    let converged_ms = millis(converged - t0);
    let boot_calls = count_endpoints(&proxy.log.between(t0, Some(converged + Duration::from_millis(500))));

    let mut restarted = 0;
    for (container, started) in &started_before {
        if raw.started_at(container).await? != *started {
            restarted += 1;
        }
    }
    let after = daemon.ready_containers().await?;
    let unchanged = before.iter().filter(|(id, c)| after.get(*id) == Some(*c)).count();
    println!("  converged in {}, {restarted} restarted, {unchanged}/{n} unchanged", ms(converged_ms));
    findings.target(
        format!("restart to converged with {n} ready backends (`kill -9`, start)"),
        format!("{}, {restarted} containers restarted", ms(converged_ms)),
        format!("≤ {RESTART_TARGET_MS:.0} ms, 0 restarted"),
        converged_ms <= RESTART_TARGET_MS && restarted == 0 && unchanged == n,
    );
    let mut s = String::new();
    writeln!(s, "### Restart to converged ({n} ready backends)\n")?;
    writeln!(s, "`kill -9` of the daemon, then `drover serve` started again; timed from the start of the new process.\n")?;
    writeln!(s, "| | |\n|---|---|")?;
    writeln!(s, "| API serves every backend `ready` in its old container | {} |", ms(millis(api_at - t0)))?;
    match pass_at {
        Some(at) => writeln!(s, "| first reconcile pass done (`drover_reconcile_passes_total` ≥ 1) | {} |", ms(millis(at - t0)))?,
        None => writeln!(s, "| first reconcile pass done | not exposed by `/metrics` |")?,
    }
    if let Some(at) = list_answered {
        writeln!(s, "| first `docker ps` (list) answered | {} |", ms(millis(at - t0)))?;
    }
    writeln!(s, "| **converged** (all of the above) | **{}** |", ms(converged_ms))?;
    writeln!(s, "| containers restarted (`StartedAt` changed) | {restarted} of {n} |")?;
    writeln!(s, "| backends in the same container, ready | {unchanged} of {n} |")?;
    writeln!(s, "| Docker calls during the boot | {} |\n", endpoint_list(&boot_calls))?;
    findings.sections.push(s);
    findings.plane.push((
        format!("restart with {n} running backends"),
        "hard-terminates every backend it finds".into(),
        format!("adopts all of them: converged in {}, {restarted} restarted", ms(converged_ms)),
    ));
    Ok(())
}

fn count_endpoints(calls: &[proxy::Call]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for call in calls {
        *counts.entry(call.endpoint.clone()).or_insert(0) += 1;
    }
    counts
}

fn endpoint_list(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(endpoint, n)| format!("`{endpoint}` × {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------
// Idle cost.

/// CPU time of a process (every thread, exited ones included) and its
/// reaped children, in seconds, at clock-tick resolution (usually 10 ms).
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime, stime, cutime, cstime are fields 14-17 of stat; here 11-14 (0-based from state).
    let ticks: u64 = fields.get(11..15)?.iter().filter_map(|f| f.parse::<u64>().ok()).sum();
    Some(ticks as f64 / clock_ticks())
}

/// CPU time of a process's live threads, in seconds, at nanosecond
/// resolution (`/proc/<pid>/task/*/schedstat`), by thread.
fn thread_cpu_seconds(pid: u32) -> HashMap<u32, f64> {
    let mut out = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let ns = std::fs::read_to_string(task.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()));
        if let Some(ns) = ns {
            out.insert(tid, ns as f64 / 1e9);
        }
    }
    out
}

/// An agent's CPU between two readings: its threads' precise time, unless
/// the coarse whole-process count saw more (threads that exited meanwhile).
struct AgentCpu {
    pid: u32,
    coarse: Option<f64>,
    threads: HashMap<u32, f64>,
}

impl AgentCpu {
    fn read(pid: u32) -> AgentCpu {
        AgentCpu {
            pid,
            coarse: process_cpu_seconds(pid),
            threads: thread_cpu_seconds(pid),
        }
    }

    /// Seconds of CPU since `self` was read.
    fn since(&self) -> Option<f64> {
        let now = AgentCpu::read(self.pid);
        let precise: f64 = now
            .threads
            .iter()
            .map(|(tid, after)| after - self.threads.get(tid).copied().unwrap_or(0.0))
            .sum();
        let coarse = now.coarse? - self.coarse?;
        Some(precise.max(coarse))
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// CPU seconds of every engine process now, by pid.
fn engine_cpu() -> HashMap<u32, f64> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if ENGINE_PROCESSES.contains(&comm.trim()) {
            if let Some(cpu) = process_cpu_seconds(pid) {
                out.insert(pid, cpu);
            }
        }
    }
    out
}

/// Resident and peak resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// What one idle window cost.
#[derive(Debug, Default)]
struct Idle {
    seconds: f64,
    engine_ms_per_s: f64,
    /// drover's, or the Plane-style sampler's (this process), CPU.
    agent_ms_per_s: Option<f64>,
    rss_kib: Option<(u64, u64)>,
    calls: BTreeMap<String, u64>,
    passes: Option<f64>,
}

/// Measures the engine's (and the agent's) CPU over `window`.
async fn idle_window(window: Duration, agent_pid: Option<u32>, proxy: Option<&Proxy>, daemon: Option<&Daemon>) -> Idle {
    let passes_before = match daemon {
        Some(d) => d.metric("drover_reconcile_passes_total").await,
        None => None,
    };
    let engine_before = engine_cpu();
    let agent_before = agent_pid.map(AgentCpu::read);
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let seconds = t0.elapsed().as_secs_f64();
    let engine_after = engine_cpu();
    let agent_cpu = agent_before.and_then(|before| before.since());
    let engine: f64 = engine_after
        .iter()
        .map(|(pid, after)| after - engine_before.get(pid).copied().unwrap_or(0.0))
        .sum();
    let calls = proxy.map(|p| count_endpoints(&p.log.between(t0, None))).unwrap_or_default();
    let passes = match (daemon, passes_before) {
        (Some(d), Some(before)) => d.metric("drover_reconcile_passes_total").await.map(|after| after - before),
        _ => None,
    };
    Idle {
        seconds,
        engine_ms_per_s: engine * 1000.0 / seconds,
        agent_ms_per_s: agent_cpu.map(|cpu| cpu * 1000.0 / seconds),
        rss_kib: agent_pid.map(rss_kib),
        calls,
        passes,
    }
}

async fn idle_cost(scale: &Scale, daemon: &mut Daemon, raw: &Raw, proxy: &Proxy, findings: &mut Findings) -> Result<()> {
    let large = scale.restart_backends;
    let small = scale.idle_small;
    let window = scale.idle_window;
    let secs = window.as_secs_f64();
    println!("idle cost: {large} and {small} backends, {secs:.0} s windows");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resync = drover::config::Config::default().reconcile.resync_interval;
    let metrics_interval = drover::config::Config::default().metrics.interval;

    // Large: drover, then no agent.
    let drover_large = idle_window(window, Some(daemon.pid()), Some(proxy), Some(daemon)).await;
    println!("  {large} drover: engine {:.1} ms/s, drover {:.1} ms/s", drover_large.engine_ms_per_s, drover_large.agent_ms_per_s.unwrap_or(0.0));
    daemon.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let none_large = idle_window(window, None, None, None).await;
    println!("  {large} no agent: engine {:.1} ms/s", none_large.engine_ms_per_s);

    // Small: drover again with `large - small` backends terminated and removed.
    daemon.spawn_process()?;
    daemon.wait_healthy(Duration::from_secs(60)).await?;
    let ready: Vec<String> = daemon.ready_containers().await?.into_keys().collect();
    let (keep, retire) = ready.split_at(small.min(ready.len()));
    for id in retire {
        daemon.hard_terminate(id).await?;
    }
    daemon.wait_all(retire, "terminated", Duration::from_secs(120)).await?;
    let dropped = daemon.container_ids(retire).await?;
    raw.remove_all(&dropped).await;
    daemon.wait_all(keep, "ready", Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let drover_small = idle_window(window, Some(daemon.pid()), Some(proxy), Some(daemon)).await;
    println!("  {small} drover: engine {:.1} ms/s, drover {:.1} ms/s", drover_small.engine_ms_per_s, drover_small.agent_ms_per_s.unwrap_or(0.0));
    daemon.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let none_small = idle_window(window, None, None, None).await;
    println!("  {small} no agent: engine {:.1} ms/s", none_small.engine_ms_per_s);

    // Plane-style: one `docker stats` stream per container, as Plane 0.5.5's drone holds.
    let containers = daemon.container_ids(keep).await?;
    let streams: Vec<_> = containers
        .iter()
        .map(|container| {
            let mut stats = raw.docker.stats(container, Some(StatsOptions { stream: true, one_shot: false }));
            tokio::spawn(async move { while let Some(Ok(_)) = stats.next().await {} })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let plane_small = idle_window(window, Some(std::process::id()), None, None).await;
    for stream in &streams {
        stream.abort();
    }
    println!("  {small} Plane-style sampler: engine {:.1} ms/s", plane_small.engine_ms_per_s);
    // drover again, its resource sampler all but off: what the rest of drover costs the engine.
    daemon.append_config("\n[metrics]\ninterval = \"1h\"\n")?;
    daemon.spawn_process()?;
    daemon.wait_healthy(Duration::from_secs(60)).await?;
    // Its first tick samples at once; let it pass.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let quiet_small = idle_window(window, Some(daemon.pid()), Some(proxy), Some(daemon)).await;
    println!("  {small} drover without sampling: engine {:.1} ms/s, drover {:.1} ms/s", quiet_small.engine_ms_per_s, quiet_small.agent_ms_per_s.unwrap_or(0.0));

    // Docker calls per resync: everything but the sampler's stats calls and the event stream.
    let per_pass = |idle: &Idle| {
        let resync_calls: u64 = idle
            .calls
            .iter()
            .filter(|(endpoint, _)| !endpoint.contains("/stats") && !endpoint.ends_with("/events"))
            .map(|(_, n)| *n)
            .sum();
        let ticks = (idle.seconds / resync.as_secs_f64()).max(1.0);
        resync_calls as f64 / ticks
    };
    let calls_large = per_pass(&drover_large);
    let calls_small = per_pass(&drover_small);
    findings.target(
        "idle resync: Docker calls per resync, whatever N",
        format!("{calls_small:.2} with {small}, {calls_large:.2} with {large}"),
        format!("≤ {CALLS_PER_PASS_TARGET:.0}"),
        calls_small.max(calls_large) <= CALLS_PER_PASS_TARGET,
    );
    let drover_total = drover_small.engine_ms_per_s + drover_small.agent_ms_per_s.unwrap_or(0.0);
    let plane_here = plane_small.engine_ms_per_s;
    let share = drover_total / plane_here;
    findings.target(
        format!("engine + drover CPU with {small} idle backends, vs the Plane-style sampler measured here"),
        format!("{drover_total:.1} ms/s = {:.1} % of {plane_here:.1} ms/s", share * 100.0),
        format!("≤ {:.0} %", PLANE_SHARE_TARGET * 100.0),
        share <= PLANE_SHARE_TARGET,
    );
    let (rss, hwm) = drover_large.rss_kib.unwrap_or((0, 0));
    let rss_mib = rss as f64 / 1024.0;
    findings.target(
        format!("daemon RSS with {large} backends"),
        format!("{rss_mib:.1} MiB (peak {:.1} MiB)", hwm as f64 / 1024.0),
        format!("≤ {RSS_TARGET_MIB:.0} MiB"),
        rss_mib <= RSS_TARGET_MIB,
    );

    let mut s = String::new();
    writeln!(s, "### Idle cost ({secs:.0} s windows, default configuration: resync every {}, metrics every {})\n",
        humantime::format_duration(resync), humantime::format_duration(metrics_interval))?;
    writeln!(s, "CPU in ms per second of wall time (1000 = one core busy). The engine is the sum of `dockerd`, `containerd`, every `containerd-shim` and every `docker-proxy` (their own and their reaped children's time, from `/proc/<pid>/stat`). The backends themselves are not counted.\n")?;
    writeln!(s, "| | backends | engine CPU | agent CPU | agent RSS | Docker calls per minute |\n|---|---|---|---|---|---|")?;
    let per_minute = |idle: &Idle| {
        let mut scaled = BTreeMap::new();
        for (endpoint, n) in &idle.calls {
            scaled.insert(endpoint.clone(), (*n as f64 * 60.0 / idle.seconds).round() as u64);
        }
        endpoint_list(&scaled)
    };
    let rss_cell = |idle: &Idle| {
        idle.rss_kib
            .map(|(rss, hwm)| format!("{:.1} MiB (peak {:.1})", rss as f64 / 1024.0, hwm as f64 / 1024.0))
            .unwrap_or_else(|| "–".into())
    };
    for (label, n, idle) in [
        ("drover", large, &drover_large),
        ("no agent", large, &none_large),
        ("drover", small, &drover_small),
        ("no agent", small, &none_small),
        ("drover, sampler all but off (`metrics.interval = \"1h\"`)", small, &quiet_small),
    ] {
        writeln!(
            s,
            "| {label} | {n} | {:.1} ms/s | {} | {} | {} |",
            idle.engine_ms_per_s,
            idle.agent_ms_per_s.map(|v| format!("{v:.2} ms/s")).unwrap_or_else(|| "–".into()),
            rss_cell(idle),
            if label.starts_with("drover") { per_minute(idle) } else { "–".into() },
        )?;
    }
    writeln!(
        s,
        "| Plane-style sampler: one `docker stats` stream per container | {small} | {:.1} ms/s | {:.2} ms/s (the client) | – | {small} streams held open |\n",
        plane_small.engine_ms_per_s,
        plane_small.agent_ms_per_s.unwrap_or(0.0)
    )?;
    if let (Some(large_passes), Some(small_passes)) = (drover_large.passes, drover_small.passes) {
        writeln!(s, "Reconcile passes in the windows: {large_passes:.0} with {large} backends, {small_passes:.0} with {small}.\n")?;
    }
    writeln!(s, "Docker calls per resync (all calls but the sampler's stats and the event stream, over the resync ticks in the window): {calls_large:.2} with {large} backends, {calls_small:.2} with {small}.\n")?;
    let stats_per_s = drover_small
        .calls
        .iter()
        .filter(|(endpoint, _)| endpoint.contains("/stats"))
        .map(|(_, n)| *n)
        .sum::<u64>() as f64
        / drover_small.seconds;
    let sampler_engine = drover_small.engine_ms_per_s - quiet_small.engine_ms_per_s;
    if stats_per_s > 0.0 {
        writeln!(
            s,
            "With {small} backends, the resource sampler's one-shot `stats` calls ({stats_per_s:.1} per second) cost the engine {sampler_engine:.1} ms/s (drover with and without sampling), {:.1} ms of engine CPU per call; a held `docker stats` stream costs it {:.1} ms per container per second (Plane-style less no agent).\n",
            sampler_engine / stats_per_s,
            (plane_small.engine_ms_per_s - none_small.engine_ms_per_s) / small as f64,
        )?;
    }
    findings.sections.push(s);
    findings.plane.push((
        format!("idle engine CPU with {small} backends"),
        format!("{plane_here:.1} ms/s measured here with one `docker stats` stream per container (the issue measured ≈ {PLANE_ISSUE_ENGINE_MS_PER_S:.0} ms/s)"),
        format!("{:.1} ms/s engine + {:.2} ms/s drover (no agent: {:.1} ms/s)",
            drover_small.engine_ms_per_s, drover_small.agent_ms_per_s.unwrap_or(0.0), none_small.engine_ms_per_s),
    ));
    Ok(())
}

// ---------------------------------------------------------------------------
// The store.

/// Spawn requests accepted per second through the API, each committed
/// (synchronous=FULL) before its answer. The image is absent and may not be
/// pulled, so the reconciler records each one as terminated at once: real
/// store contention, no containers.
async fn api_accept_rate(scale: &Scale, daemon: &Daemon, findings: &mut Findings) -> Result<()> {
    println!("store: spawn requests accepted through the API");
    let executable = json!({ "image": ABSENT_IMAGE, "pull_policy": "Never" });
    let n = scale.api_requests;
    let t0 = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        daemon.spawn(executable.clone()).await?;
        latencies.push(millis(t.elapsed()));
    }
    let sequential = n as f64 / t0.elapsed().as_secs_f64();
    let concurrency = scale.api_concurrency;
    let t0 = Instant::now();
    let left = Arc::new(AtomicUsize::new(n));
    let workers = (0..concurrency).map(|_| {
        let left = left.clone();
        let executable = executable.clone();
        async move {
            while left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
                .is_ok()
            {
                daemon.spawn(executable.clone()).await?;
            }
            anyhow::Ok(())
        }
    });
    futures::future::try_join_all(workers).await?;
    let concurrent = n as f64 / t0.elapsed().as_secs_f64();
    let latency = Stats::of(&latencies);
    println!("  {sequential:.0}/s one at a time, {concurrent:.0}/s with {concurrency} clients");
    let mut s = String::new();
    writeln!(s, "### Store\n")?;
    writeln!(s, "Spawn requests accepted, each committed to SQLite (WAL, `synchronous=FULL`: fsync before the answer) — through the API of a running daemon whose reconciler records each spawn as it goes (an absent image with pull policy `Never`: loading, then terminated; no container), and in-process straight into `Store::create_backend` on a database file in a temp dir:\n")?;
    writeln!(s, "| | one client at a time | {concurrency} concurrent clients | latency, one at a time |\n|---|---|---|---|")?;
    writeln!(s, "| API `POST /v1/backends` ({n} requests each) | {sequential:.0} /s | {concurrent:.0} /s | {} |", latency.ms())?;
    findings.sections.push(s);
    Ok(())
}

async fn store_in_process(scale: &Scale, findings: &mut Findings) -> Result<()> {
    println!("store: in-process create_backend, lifecycles, a day of metrics");
    let spec = ExecutorSpec::from_json(json!({ "image": IMAGE }))?;
    let disk = tempfile::tempdir()?;
    let store = Store::open(&disk.path().join("create.db")).await?;
    let n = scale.store_creates;
    let t0 = Instant::now();
    for _ in 0..n {
        store.create_backend(&BackendName::new_random(), &spec, None, drover::model::now_millis()).await?;
    }
    let sequential = n as f64 / t0.elapsed().as_secs_f64();
    let concurrency = scale.api_concurrency;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|worker| {
            let store = store.clone();
            let spec = spec.clone();
            let count = n / concurrency + usize::from(worker < n % concurrency);
            tokio::spawn(async move {
                for _ in 0..count {
                    store.create_backend(&BackendName::new_random(), &spec, None, drover::model::now_millis()).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let concurrent = n as f64 / t0.elapsed().as_secs_f64();
    store.close().await;
    println!("  in-process: {sequential:.0}/s one at a time, {concurrent:.0}/s with {concurrency} tasks");

    // Sizes: on tmpfs when there is one (the size does not depend on fsync; the time would).
    let size_dir = match Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm")?,
        false => tempfile::tempdir()?,
    };
    let lifecycles = scale.lifecycles;
    let (lifecycle_bytes, lifecycle_secs) = lifecycle_db_size(&size_dir.path().join("lifecycles.db"), lifecycles).await?;
    let metrics = drover::config::Config::default().metrics;
    let backends = scale.metrics_backends;
    let day = metrics_day_db_size(&size_dir.path().join("metrics.db"), backends, metrics.interval, metrics.retention).await?;

    let section = findings.sections.last_mut().context("store section")?;
    writeln!(section, "| in-process `Store::create_backend` ({n} each) | {sequential:.0} /s | {concurrent:.0} /s | |\n")?;
    writeln!(section, "Database size (after a WAL checkpoint; built on tmpfs, where fsync costs nothing, so the time is the store's CPU cost alone):\n")?;
    writeln!(section, "| workload | rows | file size | per unit |\n|---|---|---|---|")?;
    writeln!(
        section,
        "| {lifecycles} full lifecycles (scheduled → loading → starting → waiting → ready → terminating → terminated, signal recorded), {:.1} s with 8 tasks | {lifecycles} backends, {} events | {:.1} MiB | {:.0} bytes per lifecycle |",
        lifecycle_secs,
        lifecycles * 7,
        lifecycle_bytes as f64 / 1048576.0,
        lifecycle_bytes as f64 / lifecycles as f64
    )?;
    writeln!(
        section,
        "| a simulated day of metrics: {backends} running backends sampled every {} under a retention of {}, {} ticks ({:.1} s) | {} samples kept ({} deleted) | {:.1} MiB | {:.0} bytes per sample |\n",
        humantime::format_duration(metrics.interval),
        humantime::format_duration(metrics.retention),
        day.ticks,
        day.seconds,
        day.kept,
        day.deleted,
        day.bytes as f64 / 1048576.0,
        day.bytes as f64 / day.kept.max(1) as f64
    )?;
    findings.plane.push((
        "state and history".into(),
        "in memory; gone with the process".into(),
        format!("SQLite: {:.0} bytes per full lifecycle, {:.0} bytes per metrics sample", lifecycle_bytes as f64 / lifecycles as f64, day.bytes as f64 / day.kept.max(1) as f64),
    ));
    Ok(())
}

/// Drives `lifecycles` backends through their whole life in `Store`; returns
/// the database size in bytes and the seconds it took.
async fn lifecycle_db_size(path: &Path, lifecycles: usize) -> Result<(u64, f64)> {
    let store = Store::open(path).await?;
    let spec = ExecutorSpec::from_json(json!({ "image": IMAGE }))?;
    let t0 = Instant::now();
    let workers = 8;
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let store = store.clone();
            let spec = spec.clone();
            let count = lifecycles / workers + usize::from(worker < lifecycles % workers);
            tokio::spawn(async move {
                for _ in 0..count {
                    one_lifecycle(&store, &spec).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let bytes = checkpointed_size(&store, path).await?;
    Ok((bytes, seconds))
}

async fn one_lifecycle(store: &Store, spec: &ExecutorSpec) -> Result<()> {
    use drover::model::now_millis;
    let id = BackendName::new_random();
    store.create_backend(&id, spec, None, now_millis()).await?;
    let container = format!("{:032x}{:032x}", rand::random::<u128>(), rand::random::<u128>());
    let address = "127.0.0.1:32768".to_string();
    let steps: Vec<(BackendStatus, Transition)> = {
        let now = now_millis();
        let mut waiting = Transition::new(BackendState::Waiting { address: address.clone() }, EventSource::Reconciler, now);
        waiting.container_id = Some(container);
        waiting.startup_deadline = Some(now + 300_000);
        let ready = BackendState::Ready { address: Some(address) };
        let terminating_state = ready.to_terminating(TerminationReason::External);
        let mut terminating = Transition::new(terminating_state.clone(), EventSource::Reconciler, now);
        terminating.kill_deadline = Some(now + 30_000);
        let mut terminated = Transition::new(terminating_state.to_terminated(None, Some(143)), EventSource::DockerEvent, now);
        terminated.oom_killed = Some(false);
        vec![
            (BackendStatus::Scheduled, Transition::new(BackendState::Loading, EventSource::Reconciler, now)),
            (BackendStatus::Loading, Transition::new(BackendState::Starting, EventSource::Reconciler, now)),
            (BackendStatus::Starting, waiting),
            (BackendStatus::Waiting, Transition::new(ready, EventSource::Reconciler, now)),
            (BackendStatus::Ready, terminating),
            (BackendStatus::Terminating, terminated),
        ]
    };
    for (i, (from, transition)) in steps.iter().enumerate() {
        if !store.record_transition(&id, *from, transition).await? {
            bail!("transition from {from} not recorded");
        }
        if i == 4 {
            store.record_signal(&id, Signal::Term, now_millis()).await?;
        }
    }
    Ok(())
}

/// Checkpoints the WAL into the database file and returns the file's size.
async fn checkpointed_size(store: &Store, path: &Path) -> Result<u64> {
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(store.pool()).await?;
    let bytes = std::fs::metadata(path)?.len();
    store.close().await;
    Ok(bytes)
}

struct MetricsDay {
    ticks: u64,
    kept: u64,
    deleted: u64,
    bytes: u64,
    seconds: f64,
}

/// Appends a day (plus one hour, so the retention has work to do) of samples
/// for `backends` running backends with the sampler's store calls and its
/// retention policy, on a simulated clock; returns the database size.
async fn metrics_day_db_size(path: &Path, backends: usize, interval: Duration, retention: Duration) -> Result<MetricsDay> {
    use drover::metrics::{MetricsSample, RETENTION_BATCH};
    let store = Store::open(path).await?;
    let spec = ExecutorSpec::from_json(json!({ "image": IMAGE }))?;
    let mut ids = Vec::new();
    for _ in 0..backends {
        let id = BackendName::new_random();
        store.create_backend(&id, &spec, None, 0).await?;
        ids.push(id);
    }
    let t0 = Instant::now();
    let step = interval.as_millis() as i64;
    let span = (retention + Duration::from_secs(3600)).as_millis() as i64;
    let start = drover::model::now_millis() - span;
    let (mut ticks, mut deleted) = (0u64, 0u64);
    let mut at = start;
    while at < start + span {
        let samples: Vec<MetricsSample> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| MetricsSample {
                backend_id: id.clone(),
                timestamp_ms: at,
                mem_total: 3_000_000 + i as u64 * 4096,
                mem_used: 2_500_000 + (ticks % 97) * 4096,
                mem_active: 1_200_000,
                mem_inactive: 800_000,
                mem_unevictable: 0,
                mem_limit: 8_000_000_000,
                cpu_used: (ticks > 0).then_some(1_000_000 + ticks % 1000),
                sys_cpu: (ticks > 0).then_some(20_000_000_000),
                cpu_total_ns: 1_000_000 * ticks + i as u64,
                sys_cpu_total_ns: 20_000_000_000 * ticks + 1_000_000_000_000,
            })
            .collect();
        store.insert_samples(&samples).await?;
        // The sampler's retention step, on the simulated clock.
        let cutoff = at - retention.as_millis() as i64;
        for _ in 0..50 {
            let gone = store.delete_samples_before(cutoff, RETENTION_BATCH).await?;
            deleted += gone;
            if gone < u64::from(RETENTION_BATCH) {
                break;
            }
        }
        ticks += 1;
        at += step;
    }
    let kept: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM metrics_samples").fetch_one(store.pool()).await?;
    let seconds = t0.elapsed().as_secs_f64();
    let bytes = checkpointed_size(&store, path).await?;
    Ok(MetricsDay {
        ticks,
        kept: kept as u64,
        deleted,
        bytes,
        seconds,
    })
}

// ---------------------------------------------------------------------------
// The document.

fn render(scale: &Scale, date: &str, machine: &str, took: Duration, findings: &Findings) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## End to end, against the real Docker engine\n");
    let _ = writeln!(
        s,
        "Generated by `cargo bench --bench e2e` on {date}, scale `{}`, in {:.0} s, on:\n\n{machine}",
        scale.name,
        took.as_secs_f64()
    );
    let _ = writeln!(s, "Method: drover runs as a child process (`target/release/drover serve`, default configuration, its own temp database). Readiness is seen by polling drover's database read-only (every millisecond for one backend, every 5 ms in a burst). The raw floor is the same container (same image, environment, published port) made by this process with bollard — create, start, inspect for the port, then the same `HEAD /` probe every millisecond until the first HTTP answer — with no store and no reconciler. Each comparison alternates the two sides sample by sample (first side alternating too). Between samples every container is removed.\n");
    let _ = writeln!(s, "### Targets\n");
    let _ = writeln!(s, "| target | measured | required | |\n|---|---|---|---|");
    for t in &findings.targets {
        let _ = writeln!(s, "| {} | {} | {} | {} |", t.what, t.measured, t.required, verdict(t.met));
    }
    s.push('\n');
    for section in &findings.sections {
        s.push_str(section);
    }
    let _ = writeln!(s, "### Plane 0.5.5's drone for the same work\n");
    let _ = writeln!(s, "| work | Plane 0.5.5 drone | drover, this run |\n|---|---|---|");
    for (work, plane, drover) in &findings.plane {
        let _ = writeln!(s, "| {work} | {plane} | {drover} |");
    }
    s
}
