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
}

/// Runs a client command (everything but `serve`).
pub async fn run_client(api: &str, command: Command) -> anyhow::Result<()> {
    let client = Client::new(api);
    match command {
        Command::Serve(_) => unreachable!("serve is handled by main"),
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
                    ("reason", reason.to_string()),
                    ("error", b.error.clone().unwrap_or_default()),
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
