//! The `drover` command line: `serve` runs the daemon; every other command is
//! a thin client of the HTTP API (or, for `check`, of the database and Docker).
//!
//! Human output is a table; `--json` prints the API's objects unchanged.

use crate::api::{BackendView, EventView};
use crate::config::Config;
use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "drover", version, about = "Runs session backends in Docker, crash-safe, with history in SQLite")]
pub struct Cli {
    /// Base URL of the drover API.
    #[arg(long, global = true, env = "DROVER_API", default_value = "http://127.0.0.1:7171")]
    pub api: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Schedule a backend; prints its id.
    Spawn(SpawnArgs),
    /// List backends (live ones unless --all).
    Ls {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show one backend.
    Status {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Terminate a backend (SIGTERM, then SIGKILL after the grace period; --hard: SIGKILL now).
    Terminate {
        id: String,
        #[arg(long)]
        hard: bool,
    },
    /// Show every transition of a backend.
    History {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Show every backend's transitions in order; --follow keeps printing new ones.
    Events {
        #[arg(long, short)]
        follow: bool,
        /// Only transitions after this event id.
        #[arg(long, value_name = "EVENT_ID", default_value_t = 0)]
        after: i64,
        /// JSON: an array, or with --follow one object per line.
        #[arg(long)]
        json: bool,
    },
    /// Print a backend's stdout and stderr (while its container exists).
    Logs {
        id: String,
        /// Keep printing new output until the container stops.
        #[arg(long, short)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<u64>,
    },
    /// Show a backend's resource samples, oldest first.
    Metrics {
        id: String,
        /// Only samples at or after this time (RFC 3339 or ms since the epoch).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Compare the database with Docker and list discrepancies (exit code 1 if any).
    Check(CheckArgs),
    /// Run a prune pass now (containers of finished backends, and idle images
    /// drover pulled when prune.images is set); --list shows past passes.
    Prune {
        #[arg(long)]
        list: bool,
        #[arg(long)]
        json: bool,
    },
    /// Run a SQL query on the database, read-only, and print its rows (see docs/sql.md).
    Sql(SqlArgs),
}

#[derive(clap::Args, Debug)]
pub struct SqlArgs {
    /// TOML config file naming the database.
    #[arg(long, env = "DROVER_CONFIG", conflicts_with = "db")]
    pub config: Option<PathBuf>,
    /// SQLite database path (default: db_path from the config).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Print the rows as a JSON array of objects.
    #[arg(long)]
    pub json: bool,
    /// A value for ?1, ?2, ... in order (repeatable); numbers bind as numbers.
    #[arg(long = "param", value_name = "VALUE")]
    pub params: Vec<String>,
    /// The query, e.g. "SELECT id, exit_code FROM backend_lifetimes".
    pub query: String,
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// TOML config file naming the database (every key optional).
    #[arg(long, env = "DROVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// SQLite database path (overrides db_path).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// TOML config file (every key optional).
    #[arg(long, env = "DROVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// SQLite database path (overrides db_path).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// API listen address (overrides listen).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct SpawnArgs {
    #[arg(long)]
    pub image: String,
    #[arg(long)]
    pub id: Option<String>,
    /// Environment variable for the backend, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// IfNotPresent (default), Always or Never.
    #[arg(long)]
    pub pull_policy: Option<String>,
    /// Print each transition as it happens until the backend is ready; fail
    /// if it ends terminated instead.
    #[arg(long)]
    pub wait: bool,
    /// The command to run instead of the image's default.
    #[arg(last = true)]
    pub command: Vec<String>,
}

impl ServeArgs {
    /// The configuration: file, then env vars, then these flags.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(db) = &self.db {
            config.db_path = db.clone();
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        Ok(config)
    }
}

/// A client of the drover API.
pub struct Client {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            token: std::env::var("DROVER_API_TOKEN").ok().filter(|t| !t.is_empty()),
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{}", self.base, path);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the drover API at {}", self.base))?;
        let status = response.status();
        let value: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no error message");
            bail!("{message} (HTTP {})", status.as_u16());
        }
        Ok(value)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    /// A GET whose body is read as it arrives (logs); an error status fails
    /// with the API's message.
    pub async fn get_streaming(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{}", self.base, path);
        let mut request = self.http.get(&url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the drover API at {}", self.base))?;
        let status = response.status();
        if !status.is_success() {
            let value: Value = response.json().await.unwrap_or(Value::Null);
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no error message");
            bail!("{message} (HTTP {})", status.as_u16());
        }
        Ok(response)
    }
}

/// Runs a client command (everything but `serve`).
pub async fn run_client(api: &str, command: Command) -> anyhow::Result<()> {
    let client = Client::new(api);
    match command {
        Command::Serve(_) => unreachable!("serve is handled by main"),
        Command::Check(args) => check(args).await?,
        Command::Prune { list, json } => prune(&client, list, json).await?,
        Command::Sql(args) => sql(args).await?,
        Command::Logs { id, follow, tail } => logs(&client, &id, follow, tail).await?,
        Command::Metrics { id, since, json } => metrics(&client, &id, since, json).await?,
        Command::Events { follow, after, json } => events(&client, follow, after, json).await?,
        Command::Spawn(args) => {
            let mut env = serde_json::Map::new();
            for pair in &args.env {
                let (key, value) = pair
                    .split_once('=')
                    .with_context(|| format!("--env {pair:?}: expected KEY=VALUE"))?;
                env.insert(key.to_string(), Value::String(value.to_string()));
            }
            let mut executable = json!({ "image": args.image, "env": env });
            if let Some(policy) = args.pull_policy {
                executable["pull_policy"] = Value::String(policy);
            }
            if !args.command.is_empty() {
                executable["command"] = json!(args.command);
            }
            let mut body = json!({ "executable": executable });
            if let Some(id) = args.id {
                body["id"] = Value::String(id);
            }
            let backend: BackendView = serde_json::from_value(client.post("/v1/backends", body).await?)?;
            println!("{}", backend.id);
            if args.wait {
                wait_for_spawn(&client, &backend.id).await?;
            }
        }
        Command::Ls { all, json } => {
            let path = if all { "/v1/backends" } else { "/v1/backends?live=true" };
            let value = client.get(path).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let backends: Vec<BackendView> = serde_json::from_value(value)?;
                let rows = backends
                    .iter()
                    .map(|b| {
                        vec![
                            b.id.clone(),
                            b.status.clone(),
                            b.address.clone().unwrap_or_default(),
                            b.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                            b.executable["image"].as_str().unwrap_or("").to_string(),
                            b.created_at.clone(),
                        ]
                    })
                    .collect();
                print_table(&["ID", "STATUS", "ADDRESS", "EXIT", "IMAGE", "CREATED"], rows);
            }
        }
        Command::Status { id, json } => {
            let value = client.get(&format!("/v1/backends/{id}")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let b: BackendView = serde_json::from_value(value)?;
                let reason = b.state.get("reason").and_then(Value::as_str).unwrap_or("");
                let fields = [
                    ("id", b.id.clone()),
                    ("status", b.status.clone()),
                    ("desired", b.desired.clone()),
                    ("image", b.executable["image"].as_str().unwrap_or("").to_string()),
                    ("address", b.address.clone().unwrap_or_default()),
                    ("container", b.container_id.clone().unwrap_or_default()),
                    ("exit code", b.exit_code.map(|c| c.to_string()).unwrap_or_default()),
                    ("oom killed", if b.oom_killed == Some(true) { "yes".into() } else { String::new() }),
                    ("reason", reason.to_string()),
                    ("error", b.error.clone().unwrap_or_default()),
                    ("loading", b.loading_detail.clone().unwrap_or_default()),
                    ("created", b.created_at.clone()),
                    ("updated", b.updated_at.clone()),
                ];
                for (name, value) in fields {
                    if !value.is_empty() {
                        println!("{name:<10} {value}");
                    }
                }
            }
        }
        Command::Terminate { id, hard } => {
            let b: BackendView = serde_json::from_value(
                client
                    .post(&format!("/v1/backends/{id}/terminate"), json!({ "hard": hard }))
                    .await?,
            )?;
            if b.status == "terminated" {
                println!("{} already terminated", b.id);
            } else {
                println!("{} terminating ({})", b.id, if hard { "hard" } else { "soft" });
            }
        }
        Command::History { id, json } => {
            let value = client.get(&format!("/v1/backends/{id}/events")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let events: Vec<EventView> = serde_json::from_value(value)?;
                let rows = events
                    .iter()
                    .map(|e| {
                        let detail = [
                            e.state.get("address").and_then(Value::as_str).map(str::to_string),
                            e.state.get("reason").and_then(Value::as_str).map(|r| format!("reason={r}")),
                            e.exit_code.map(|c| format!("exit={c}")),
                            e.error.clone(),
                        ]
                        .into_iter()
                        .flatten()
                        .collect::<Vec<_>>()
                        .join(" ");
                        vec![e.timestamp.clone(), e.status.clone(), e.source.clone(), detail]
                    })
                    .collect();
                print_table(&["TIME", "STATUS", "SOURCE", "DETAIL"], rows);
            }
        }
    }
    Ok(())
}

/// `drover check`: reads the database (read-only) and Docker, prints the
/// report, and fails when there is any discrepancy.
async fn check(args: CheckArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(db) = args.db {
        config.db_path = db;
    }
    let store = crate::store::ReadOnlyStore::open(&config.db_path).await?;
    let docker = crate::docker::DockerClient::connect(store.instance_id()).await?;
    let report = crate::check::run(&store, &docker).await?;
    store.close().await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let rows = report
            .discrepancies
            .iter()
            .map(|d| {
                vec![
                    d.kind().to_string(),
                    d.backend().unwrap_or("").to_string(),
                    d.container(),
                    d.detail(),
                ]
            })
            .collect();
        if !report.is_clean() {
            print_table(&["KIND", "BACKEND", "CONTAINER", "DETAIL"], rows);
        }
        println!(
            "instance {}: {} backends ({} live), {} containers, {} exits checked: {} discrepancies",
            report.instance_id,
            report.backends,
            report.live_backends,
            report.containers,
            report.exits_checked,
            report.discrepancies.len()
        );
    }
    if !report.is_clean() {
        bail!(
            "{} discrepancies between {} and docker",
            report.discrepancies.len(),
            config.db_path.display()
        );
    }
    Ok(())
}

/// `drover logs`: copies the container's output to stdout as it arrives.
async fn logs(client: &Client, id: &str, follow: bool, tail: Option<u64>) -> anyhow::Result<()> {
    use futures::StreamExt;
    use std::io::Write;
    let mut path = format!("/v1/backends/{id}/logs?follow={follow}");
    if let Some(tail) = tail {
        path.push_str(&format!("&tail={tail}"));
    }
    let mut body = client.get_streaming(&path).await?.bytes_stream();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = body.next().await {
        stdout.write_all(&chunk.context("log stream broke")?)?;
        stdout.flush()?;
    }
    Ok(())
}

/// `drover metrics`: a backend's samples as a table (memory in MiB, CPU as
/// the share of one core over each interval) or the API's JSON.
async fn metrics(client: &Client, id: &str, since: Option<String>, json: bool) -> anyhow::Result<()> {
    use crate::api::metrics::SampleView;
    let mut path = format!("/v1/backends/{id}/metrics");
    if let Some(since) = since {
        path.push_str(&format!("?since={}", percent_encode_query(&since)));
    }
    let value = client.get(&path).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let samples: Vec<SampleView> = serde_json::from_value(value)?;
    let mib = |bytes: u64| format!("{:.1}", bytes as f64 / (1024.0 * 1024.0));
    let mut previous: Option<&SampleView> = None;
    let mut rows = Vec::with_capacity(samples.len());
    for sample in &samples {
        // cpu_used / wall time between samples: 100% is one core busy.
        let cpu = match (sample.cpu_used, previous) {
            (Some(used), Some(before)) if sample.timestamp_ms > before.timestamp_ms => {
                let wall_ns = (sample.timestamp_ms - before.timestamp_ms) as f64 * 1e6;
                format!("{:.1}%", used as f64 / wall_ns * 100.0)
            }
            _ => String::new(),
        };
        rows.push(vec![
            sample.timestamp.clone(),
            mib(sample.mem_used),
            mib(sample.mem_total),
            mib(sample.mem_limit),
            cpu,
        ]);
        previous = Some(sample);
    }
    print_table(&["TIME", "MEM USED MiB", "MEM TOTAL MiB", "LIMIT MiB", "CPU"], rows);
    Ok(())
}

/// Escapes a query value (`+` and `:` in RFC 3339 times).
fn percent_encode_query(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Prints rows as left-aligned columns under a header.
pub fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let text = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths[i]))
            .collect::<Vec<_>>()
            .join("  ");
        println!("{}", text.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

/// `drover events`: history after `after` as a table or JSON array; with
/// `follow`, then each new transition as it happens, one line each.
async fn events(client: &Client, follow: bool, after: i64, json: bool) -> anyhow::Result<()> {
    if follow {
        return follow_events(client, after, |event| {
            if json {
                println!("{}", serde_json::to_string(&event).unwrap_or_default());
            } else {
                let line = format!(
                    "{}  {}  {:<16} {}",
                    event.timestamp,
                    event.backend_id,
                    event.status,
                    event_detail(&event)
                );
                println!("{}", line.trim_end());
            }
            std::ops::ControlFlow::Continue(())
        })
        .await;
    }
    let mut all: Vec<EventView> = Vec::new();
    let mut cursor = after;
    loop {
        let page: Vec<EventView> =
            serde_json::from_value(client.get(&format!("/v1/events?after={cursor}&limit=1000")).await?)?;
        let Some(last) = page.last() else { break };
        cursor = last.event_id;
        all.extend(page);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        let rows = all
            .iter()
            .map(|e| {
                vec![
                    e.event_id.to_string(),
                    e.timestamp.clone(),
                    e.backend_id.clone(),
                    e.status.clone(),
                    e.source.clone(),
                    event_detail(e),
                ]
            })
            .collect();
        print_table(&["ID", "TIME", "BACKEND", "STATUS", "SOURCE", "DETAIL"], rows);
    }
    Ok(())
}

/// `drover spawn --wait`: prints the backend's transitions so far, then each
/// new one, until it is ready (Ok) or terminated (an error, so a non-zero exit).
async fn wait_for_spawn(client: &Client, id: &str) -> anyhow::Result<()> {
    use std::ops::ControlFlow;
    let history: Vec<EventView> =
        serde_json::from_value(client.get(&format!("/v1/backends/{id}/events")).await?)?;
    let mut after = 0;
    let mut outcome = None;
    let show = |event: &EventView| -> ControlFlow<Result<(), String>> {
        let line = format!("{}  {:<16} {}", event.timestamp, event.status, event_detail(event));
        println!("{}", line.trim_end());
        match event.status.as_str() {
            "ready" => ControlFlow::Break(Ok(())),
            "terminated" => ControlFlow::Break(Err(event_detail(event))),
            _ => ControlFlow::Continue(()),
        }
    };
    for event in &history {
        after = after.max(event.event_id);
        if let ControlFlow::Break(end) = show(event) {
            outcome = Some(end);
            break;
        }
    }
    if outcome.is_none() {
        follow_events(client, after, |event| {
            if event.backend_id != id {
                return ControlFlow::Continue(());
            }
            match show(&event) {
                ControlFlow::Break(end) => {
                    outcome = Some(end);
                    ControlFlow::Break(())
                }
                ControlFlow::Continue(()) => ControlFlow::Continue(()),
            }
        })
        .await?;
    }
    match outcome {
        Some(Ok(())) => Ok(()),
        Some(Err(detail)) => bail!("backend {id} terminated before it was ready ({detail})"),
        None => bail!("the event stream ended before backend {id} was ready"),
    }
}

/// Follows `GET /v1/events?follow=true` after `after`, handing each
/// transition to `on_event` until it breaks; the stream ending is an error.
async fn follow_events(
    client: &Client,
    after: i64,
    mut on_event: impl FnMut(EventView) -> std::ops::ControlFlow<()>,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let response = client
        .get_streaming(&format!("/v1/events?follow=true&after={after}"))
        .await?;
    let mut body = response.bytes_stream();
    let mut decoder = crate::api::events::SseDecoder::default();
    while let Some(chunk) = body.next().await {
        for message in decoder.push(&chunk.context("event stream broke")?) {
            let event: EventView = serde_json::from_str(&message.data)
                .with_context(|| format!("bad event in stream: {}", message.data))?;
            if on_event(event).is_break() {
                return Ok(());
            }
        }
    }
    bail!("the event stream ended (the daemon stopped)")
}

/// The interesting parts of a transition's state, for one line of text.
fn event_detail(event: &EventView) -> String {
    [
        event.state.get("address").and_then(Value::as_str).map(str::to_string),
        event.state.get("reason").and_then(Value::as_str).map(|r| format!("reason={r}")),
        event.exit_code.map(|c| format!("exit={c}")),
        event.error.clone(),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" ")
}

/// `drover prune`: one pass now through the API, or the journal of passes.
async fn prune(client: &Client, list: bool, json: bool) -> anyhow::Result<()> {
    use crate::api::prune::PruneRunView;
    let value = if list {
        client.get("/v1/prune-runs").await?
    } else {
        Value::Array(vec![client.post("/v1/prune", Value::Null).await?])
    };
    if json {
        let shown = if list { &value } else { &value[0] };
        println!("{}", serde_json::to_string_pretty(shown)?);
        return Ok(());
    }
    let runs: Vec<PruneRunView> = serde_json::from_value(value)?;
    let rows = runs
        .into_iter()
        .map(|run| {
            vec![
                run.run_id.to_string(),
                run.started_at,
                run.finished_at.unwrap_or_default(),
                run.triggered_by,
                run.containers_removed.to_string(),
                run.images_removed.to_string(),
                run.bytes_reclaimed.to_string(),
                run.error.unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &["RUN", "STARTED", "FINISHED", "BY", "CONTAINERS", "IMAGES", "BYTES", "ERROR"],
        rows,
    );
    Ok(())
}

/// `drover sql`: a query on a read-only connection to the database.
async fn sql(args: SqlArgs) -> anyhow::Result<()> {
    use crate::store::sql::{query_read_only, SqlParam};
    let path = match args.db {
        Some(db) => db,
        None => Config::load(args.config.as_deref())?.db_path,
    };
    let params: Vec<SqlParam> = args.params.iter().map(|p| SqlParam::infer(p)).collect();
    let result = query_read_only(&path, &args.query, &params).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result.to_objects())?);
        return Ok(());
    }
    let header: Vec<&str> = result.columns.iter().map(String::as_str).collect();
    let count = result.rows.len();
    let rows = result
        .rows
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|value| match value {
                    Value::Null => String::new(),
                    Value::String(text) => text,
                    other => other.to_string(),
                })
                .collect()
        })
        .collect();
    print_table(&header, rows);
    println!("({count} row{})", if count == 1 { "" } else { "s" });
    Ok(())
}
