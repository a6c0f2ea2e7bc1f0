//! The Docker adapter: the only module that names bollard.
//!
//! It turns Docker's answers into domain types ([`ObservedContainer`],
//! [`ObservedExit`], [`ContainerEvent`]) and Docker's errors into
//! [`DockerError`] variants the caller can decide on. It decides nothing
//! itself, and it only ever lists, watches or acts on containers carrying this
//! instance's label.

use crate::model::{
    BackendName, EventSource, ExecutorSpec, Millis, ObservedContainer, ObservedExit, RunState,
    Signal, CONTAINER_PORT, LABEL_BACKEND_NAME, LABEL_INSTANCE, LABEL_PLANE_BACKEND,
};
use bollard::container::{
    Config as ContainerConfig, CreateContainerOptions, InspectContainerOptions,
    KillContainerOptions, ListContainersOptions, LogsOptions, MemoryStatsStats,
    RemoveContainerOptions, StartContainerOptions, Stats, StatsOptions,
};
use bollard::image::CreateImageOptions;
use bollard::models::{HostConfig, PortBinding, ResourcesUlimits};
use bollard::system::EventsOptions;
use bollard::Docker;
use futures::{Stream, StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub type Result<T, E = DockerError> = std::result::Result<T, E>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DockerError {
    /// The engine could not be reached: worth retrying later.
    #[error("docker engine unreachable at {endpoint}: {message}")]
    Unavailable { endpoint: String, message: String },
    #[error("not found: {0}")]
    NotFound(String),
    /// A container with that name exists already.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The engine answered and refused: retrying the same request won't help.
    #[error("docker refused ({status}): {message}")]
    Rejected { status: u16, message: String },
}

impl DockerError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, DockerError::Unavailable { .. })
    }
}

/// What the daemon passes to every container it creates, besides the spec.
#[derive(Clone, Debug, Default)]
pub struct ContainerOptions {
    /// Extra environment (key, fencing token, static token), added after the spec's.
    pub extra_env: Vec<(String, String)>,
    /// Host folder mounted at `/plane-data`, already resolved and created.
    pub mount: Option<PathBuf>,
    pub runtime: Option<String>,
    pub log_driver: Option<(String, HashMap<String, String>)>,
}

/// Counts of Docker API calls by endpoint, for `/metrics` and benchmarks.
#[derive(Debug, Default)]
pub struct CallCounters {
    pub list: AtomicU64,
    pub inspect: AtomicU64,
    pub create: AtomicU64,
    pub start: AtomicU64,
    pub kill: AtomicU64,
    pub remove: AtomicU64,
    pub image: AtomicU64,
    pub events: AtomicU64,
    pub stats: AtomicU64,
    pub other: AtomicU64,
    pub errors: AtomicU64,
}

impl CallCounters {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        [
            ("list", &self.list),
            ("inspect", &self.inspect),
            ("create", &self.create),
            ("start", &self.start),
            ("kill", &self.kill),
            ("remove", &self.remove),
            ("image", &self.image),
            ("events", &self.events),
            ("stats", &self.stats),
            ("other", &self.other),
        ]
        .into_iter()
        .map(|(name, counter)| (name, counter.load(Ordering::Relaxed)))
        .collect()
    }
}

/// What Docker reports of one event on a container of this instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerEvent {
    pub backend: BackendName,
    pub container_id: String,
    pub action: ContainerAction,
    pub time_ms: Millis,
    /// The event's time in nanoseconds, for resuming the stream with `since`.
    pub time_nano: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerAction {
    Create,
    Start,
    Die { exit_code: Option<i32> },
    Oom,
    Destroy,
}

/// Details read by inspecting one container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InspectedContainer {
    pub container_id: String,
    pub run_state: RunState,
    pub host_port: Option<u16>,
    pub started_at: Option<String>,
    /// Set when the container has stopped.
    pub exit: Option<ObservedExit>,
}

/// One reading of a running container's resources, with Plane's field
/// meanings (`BackendMetricsMessage`), for cgroup v1 and v2 alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContainerStats {
    /// Resident plus page cache (v1: `total_rss + total_cache`; v2: `anon + file + kernel`).
    pub mem_total: u64,
    /// Docker's usage less the inactive file cache, as `docker stats` shows it.
    pub mem_used: u64,
    pub mem_active: u64,
    pub mem_inactive: u64,
    pub mem_unevictable: u64,
    /// The container's memory limit (the host's memory when it has none).
    pub mem_limit: u64,
    /// CPU time used by the container since it started, in nanoseconds (cumulative).
    pub cpu_total_ns: u64,
    /// CPU time used by the whole host since boot, in nanoseconds (cumulative).
    pub system_cpu_ns: u64,
}

/// An image as inspect reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image id, `sha256:...`.
    pub id: String,
    pub size: i64,
}

/// What removing an image reference did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageRemoval {
    /// Ids of the images and layers deleted; empty when the reference was
    /// only untagged (another reference still names the image).
    pub deleted: Vec<String>,
}

#[derive(Clone)]
pub struct DockerClient {
    docker: Docker,
    instance_id: String,
    endpoint: String,
    calls: Arc<CallCounters>,
}

/// Where Docker is expected, as users name it: `DOCKER_HOST` or the local socket.
pub fn docker_endpoint() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string())
}

impl DockerClient {
    /// Connects to the engine named by `DOCKER_HOST` (or the local socket),
    /// negotiates the API version with it, and checks it answers.
    pub async fn connect(instance_id: &str) -> Result<Self> {
        let endpoint = docker_endpoint();
        let unavailable = |message: String| DockerError::Unavailable {
            endpoint: endpoint.clone(),
            message,
        };
        let docker = Docker::connect_with_defaults().map_err(|e| unavailable(e.to_string()))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let client = Self {
            docker,
            instance_id: instance_id.to_string(),
            endpoint: endpoint.clone(),
            calls: Arc::default(),
        };
        client.ping().await?;
        Ok(client)
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn calls(&self) -> &Arc<CallCounters> {
        &self.calls
    }

    fn convert(&self, error: bollard::errors::Error) -> DockerError {
        use bollard::errors::Error as E;
        self.calls.errors.fetch_add(1, Ordering::Relaxed);
        match error {
            E::DockerResponseServerError {
                status_code: 404,
                message,
            } => DockerError::NotFound(message),
            E::DockerResponseServerError {
                status_code: 409,
                message,
            } => DockerError::Conflict(message),
            E::DockerResponseServerError {
                status_code,
                message,
            } => DockerError::Rejected {
                status: status_code,
                message,
            },
            E::DockerStreamError { error } => DockerError::Rejected {
                status: 500,
                message: error,
            },
            other => DockerError::Unavailable {
                endpoint: self.endpoint.clone(),
                message: other.to_string(),
            },
        }
    }

    pub async fn ping(&self) -> Result<()> {
        self.calls.other.fetch_add(1, Ordering::Relaxed);
        self.docker.ping().await.map_err(|e| self.convert(e))?;
        Ok(())
    }

    fn instance_label(&self) -> String {
        format!("{LABEL_INSTANCE}={}", self.instance_id)
    }

    /// Every container of this instance, running or not, in one call.
    pub async fn list_managed(&self) -> Result<Vec<ObservedContainer>> {
        self.calls.list.fetch_add(1, Ordering::Relaxed);
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_PLANE_BACKEND}=true"), self.instance_label()],
        )]);
        let summaries = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters,
                ..Default::default()
            }))
            .await
            .map_err(|e| self.convert(e))?;
        Ok(summaries
            .into_iter()
            .filter_map(|summary| {
                let labels = summary.labels.unwrap_or_default();
                let backend = BackendName::parse(labels.get(LABEL_BACKEND_NAME)?).ok()?;
                let host_port = summary.ports.unwrap_or_default().into_iter().find_map(|p| {
                    (p.private_port == CONTAINER_PORT)
                        .then_some(p.public_port)
                        .flatten()
                });
                Some(ObservedContainer {
                    container_id: summary.id?,
                    backend,
                    run_state: run_state_of(summary.state.as_deref().unwrap_or("")),
                    host_port,
                    exit: None,
                })
            })
            .collect())
    }

    /// Inspects a container; `None` when it no longer exists.
    pub async fn inspect(&self, container: &str) -> Result<Option<InspectedContainer>> {
        self.calls.inspect.fetch_add(1, Ordering::Relaxed);
        let details = match self
            .docker
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
        {
            Ok(details) => details,
            Err(e) => {
                return match self.convert(e) {
                    DockerError::NotFound(_) => Ok(None),
                    other => Err(other),
                }
            }
        };
        let state = details.state.unwrap_or_default();
        let status = state
            .status
            .map(|s| s.to_string())
            .unwrap_or_default();
        let run_state = run_state_of(&status);
        let host_port = details
            .network_settings
            .and_then(|n| n.ports)
            .and_then(|ports| ports.get(&format!("{CONTAINER_PORT}/tcp")).cloned().flatten())
            .and_then(|bindings| {
                bindings
                    .into_iter()
                    .find_map(|b| b.host_port.and_then(|p| p.parse().ok()))
            });
        let exit = (run_state == RunState::Exited).then(|| ObservedExit {
            exit_code: state.exit_code.map(|c| c as i32),
            finished_at: state
                .finished_at
                .as_deref()
                .and_then(parse_docker_time)
                .unwrap_or_else(crate::model::now_millis),
            oom_killed: state.oom_killed.unwrap_or(false),
            source: EventSource::Inspect,
        });
        Ok(Some(InspectedContainer {
            container_id: details.id.unwrap_or_else(|| container.to_string()),
            run_state,
            host_port,
            started_at: state.started_at,
            exit,
        }))
    }

    pub async fn image_present(&self, image: &str) -> Result<bool> {
        self.calls.image.fetch_add(1, Ordering::Relaxed);
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) => match self.convert(e) {
                DockerError::NotFound(_) => Ok(false),
                other => Err(other),
            },
        }
    }

    /// The id (`sha256:...`) and size of the image a reference names; `None`
    /// when there is no such image.
    pub async fn image_info(&self, image: &str) -> Result<Option<ImageInfo>> {
        self.calls.image.fetch_add(1, Ordering::Relaxed);
        match self.docker.inspect_image(image).await {
            Ok(inspect) => Ok(Some(ImageInfo {
                id: inspect.id.unwrap_or_default(),
                size: inspect.size.unwrap_or(0),
            })),
            Err(e) => match self.convert(e) {
                DockerError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    /// Removes an image reference, never by force: an image a container still
    /// uses (even a stopped one) is [`DockerError::Conflict`]. When other
    /// references name the same image, only this one goes (an untag).
    pub async fn remove_image(&self, image: &str) -> Result<ImageRemoval> {
        self.calls.image.fetch_add(1, Ordering::Relaxed);
        let items = self
            .docker
            .remove_image(
                image,
                Some(bollard::image::RemoveImageOptions {
                    force: false,
                    noprune: false,
                }),
                None,
            )
            .await
            .map_err(|e| self.convert(e))?;
        Ok(ImageRemoval {
            deleted: items.into_iter().filter_map(|item| item.deleted).collect(),
        })
    }

    /// The size of a container's writable layer (`SizeRw`); `None` when the
    /// container is gone.
    pub async fn container_size(&self, container: &str) -> Result<Option<i64>> {
        self.calls.inspect.fetch_add(1, Ordering::Relaxed);
        match self
            .docker
            .inspect_container(container, Some(InspectContainerOptions { size: true }))
            .await
        {
            Ok(details) => Ok(Some(details.size_rw.unwrap_or(0))),
            Err(e) => match self.convert(e) {
                DockerError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    /// Pulls an image, logging progress at debug level and reporting each
    /// status line to `progress`.
    pub async fn pull(
        &self,
        image: &str,
        credentials: Option<&crate::model::RegistryCredentials>,
        mut progress: impl FnMut(&str),
    ) -> Result<()> {
        self.calls.image.fetch_add(1, Ordering::Relaxed);
        let (from_image, tag) = split_tag(image);
        let auth = credentials.map(|c| bollard::auth::DockerCredentials {
            username: Some(c.username.clone()),
            password: Some(c.password.clone()),
            ..Default::default()
        });
        let mut stream = self.docker.create_image(
            Some(CreateImageOptions {
                from_image,
                tag,
                ..Default::default()
            }),
            None,
            auth,
        );
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| self.convert(e))?;
            if let Some(error) = info.error {
                return Err(DockerError::Rejected {
                    status: 500,
                    message: error,
                });
            }
            let line = [info.status.as_deref(), info.progress.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ");
            if !line.is_empty() {
                tracing::debug!(image, progress = %line, "pull progress");
                progress(&line);
            }
        }
        Ok(())
    }

    /// Creates the backend's container (named `plane-ID`, labelled for this
    /// instance). A name already taken is [`DockerError::Conflict`].
    pub async fn create(
        &self,
        backend: &BackendName,
        spec: &ExecutorSpec,
        options: &ContainerOptions,
    ) -> Result<String> {
        self.calls.create.fetch_add(1, Ordering::Relaxed);
        let config = container_config(backend, spec, options, &self.instance_id);
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: backend.container_name(),
                    platform: None,
                }),
                config,
            )
            .await
            .map_err(|e| self.convert(e))?;
        Ok(created.id)
    }

    pub async fn start(&self, container: &str) -> Result<()> {
        self.calls.start.fetch_add(1, Ordering::Relaxed);
        match self
            .docker
            .start_container(container, None::<StartContainerOptions<String>>)
            .await
        {
            Ok(()) => Ok(()),
            // 304: already started.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(self.convert(e)),
        }
    }

    /// Sends a signal. A container that is gone or not running is not an error.
    pub async fn kill(&self, container: &str, signal: Signal) -> Result<()> {
        self.calls.kill.fetch_add(1, Ordering::Relaxed);
        match self
            .docker
            .kill_container(
                container,
                Some(KillContainerOptions {
                    signal: signal.as_str(),
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => match self.convert(e) {
                DockerError::NotFound(_) | DockerError::Conflict(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Removes a stopped container (forcefully when `force`).
    pub async fn remove(&self, container: &str, force: bool) -> Result<()> {
        self.calls.remove.fetch_add(1, Ordering::Relaxed);
        match self
            .docker
            .remove_container(
                container,
                Some(RemoveContainerOptions {
                    force,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => match self.convert(e) {
                DockerError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    /// The container's output, as text chunks.
    pub fn logs(
        &self,
        container: &str,
        follow: bool,
        tail: Option<u64>,
    ) -> impl Stream<Item = Result<String>> + Send + 'static {
        self.calls.other.fetch_add(1, Ordering::Relaxed);
        let this = self.clone();
        self.docker
            .logs(
                container,
                Some(LogsOptions::<String> {
                    follow,
                    stdout: true,
                    stderr: true,
                    tail: tail.map(|n| n.to_string()).unwrap_or_else(|| "all".into()),
                    ..Default::default()
                }),
            )
            .map_ok(|chunk| chunk.to_string())
            .map_err(move |e| this.convert(e))
    }

    /// One reading of a container's resources, in a single call (`one-shot`:
    /// no second cycle for `precpu_stats`, no stream). `None` when the
    /// container is gone or not running.
    pub async fn stats(&self, container: &str) -> Result<Option<ContainerStats>> {
        self.calls.stats.fetch_add(1, Ordering::Relaxed);
        let mut stream = self.docker.stats(
            container,
            Some(StatsOptions {
                stream: false,
                one_shot: true,
            }),
        );
        match stream.next().await {
            Some(Ok(stats)) => Ok(container_stats(&stats)),
            Some(Err(e)) => match self.convert(e) {
                DockerError::NotFound(_) => Ok(None),
                other => Err(other),
            },
            None => Ok(None),
        }
    }

    /// The last `die` of the backend's container within `window`, from
    /// Docker's event log (a bounded replay, not a live stream).
    pub async fn recent_exit(
        &self,
        backend: &BackendName,
        window: std::time::Duration,
    ) -> Result<Option<ObservedExit>> {
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
        let since = now - window.as_nanos() as i64;
        let events: Vec<ContainerEvent> = self
            .events(Some(docker_timestamp(since)), Some(docker_timestamp(now)))
            .try_collect()
            .await?;
        let oom = events
            .iter()
            .any(|e| e.backend == *backend && e.action == ContainerAction::Oom);
        Ok(events
            .into_iter()
            .filter(|e| e.backend == *backend)
            .filter_map(|e| match e.action {
                ContainerAction::Die { exit_code } => Some(ObservedExit {
                    exit_code,
                    finished_at: e.time_ms,
                    oom_killed: oom,
                    source: EventSource::DockerEvent,
                }),
                _ => None,
            })
            .last())
    }

    /// Docker's events for this instance's containers. With `until`, the
    /// stream ends there (a replay); without, it follows live.
    pub fn events(
        &self,
        since: Option<String>,
        until: Option<String>,
    ) -> impl Stream<Item = Result<ContainerEvent>> + Send + 'static {
        self.calls.events.fetch_add(1, Ordering::Relaxed);
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("label".to_string(), vec![self.instance_label()]),
            (
                "event".to_string(),
                ["create", "start", "die", "oom", "destroy"]
                    .map(String::from)
                    .to_vec(),
            ),
        ]);
        let this = self.clone();
        self.docker
            .events(Some(EventsOptions {
                since,
                until,
                filters,
            }))
            .map_err(move |e| this.convert(e))
            .try_filter_map(|message| async move { Ok(container_event(message)) })
    }
}

fn container_event(message: bollard::models::EventMessage) -> Option<ContainerEvent> {
    let actor = message.actor?;
    let attributes = actor.attributes.unwrap_or_default();
    let backend = BackendName::parse(attributes.get(LABEL_BACKEND_NAME)?).ok()?;
    let action = match message.action.as_deref()? {
        "create" => ContainerAction::Create,
        "start" => ContainerAction::Start,
        "die" => ContainerAction::Die {
            exit_code: attributes.get("exitCode").and_then(|c| c.parse().ok()),
        },
        "oom" => ContainerAction::Oom,
        "destroy" => ContainerAction::Destroy,
        _ => return None,
    };
    let time_nano = message
        .time_nano
        .or(message.time.map(|s| s * 1_000_000_000))
        .unwrap_or(0);
    Some(ContainerEvent {
        backend,
        container_id: actor.id?,
        action,
        time_ms: time_nano / 1_000_000,
        time_nano,
    })
}

/// Plane's reading of Docker's stats: memory from the cgroup's own counters
/// (v1 `total_*` keys, or v2 keys), CPU as the raw cumulative counters.
/// `None` for a container that is not running (Docker answers with empty stats).
fn container_stats(stats: &Stats) -> Option<ContainerStats> {
    let memory = &stats.memory_stats;
    let usage = memory.usage?;
    let limit = memory.limit?;
    let system_cpu_ns = stats.cpu_stats.system_cpu_usage?;
    let (mem_total, mem_active, mem_inactive, mem_unevictable, inactive_file) = match memory.stats? {
        MemoryStatsStats::V1(v1) => (
            v1.total_rss + v1.total_cache,
            v1.total_active_anon + v1.total_active_file,
            v1.total_inactive_anon + v1.total_inactive_file,
            v1.total_unevictable,
            v1.total_inactive_file,
        ),
        MemoryStatsStats::V2(v2) => (
            v2.anon + v2.file + v2.kernel_stack + v2.sock + v2.slab,
            v2.active_anon + v2.active_file,
            v2.inactive_anon + v2.inactive_file,
            v2.unevictable,
            v2.inactive_file,
        ),
    };
    Some(ContainerStats {
        mem_total,
        mem_used: usage.saturating_sub(inactive_file),
        mem_active,
        mem_inactive,
        mem_unevictable,
        mem_limit: limit,
        cpu_total_ns: stats.cpu_stats.cpu_usage.total_usage,
        system_cpu_ns,
    })
}

/// Formats a nanosecond instant as Docker's `since`/`until` parameter.
pub fn docker_timestamp(time_nano: i64) -> String {
    format!(
        "{}.{:09}",
        time_nano.div_euclid(1_000_000_000),
        time_nano.rem_euclid(1_000_000_000)
    )
}

fn run_state_of(status: &str) -> RunState {
    match status {
        "created" => RunState::Created,
        "exited" | "dead" => RunState::Exited,
        // running, paused, restarting, removing: the process may still exist.
        _ => RunState::Running,
    }
}

fn parse_docker_time(raw: &str) -> Option<Millis> {
    let parsed = chrono::DateTime::parse_from_rfc3339(raw).ok()?;
    let millis = parsed.timestamp_millis();
    // Docker reports "0001-01-01T00:00:00Z" for "never".
    (millis > 0).then_some(millis)
}

/// Splits `repo:tag` (a registry port is not a tag); no tag means `latest`.
fn split_tag(image: &str) -> (String, String) {
    if image.contains('@') {
        return (image.to_string(), String::new());
    }
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => {
            (image[..colon].to_string(), image[colon + 1..].to_string())
        }
        _ => (image.to_string(), "latest".to_string()),
    }
}

fn container_config(
    backend: &BackendName,
    spec: &ExecutorSpec,
    options: &ContainerOptions,
    instance_id: &str,
) -> ContainerConfig<String> {
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.push(format!("PORT={CONTAINER_PORT}"));
    env.push(format!("SESSION_BACKEND_ID={backend}"));
    env.extend(options.extra_env.iter().map(|(k, v)| format!("{k}={v}")));
    let labels = HashMap::from([
        (LABEL_PLANE_BACKEND.to_string(), "true".to_string()),
        (LABEL_INSTANCE.to_string(), instance_id.to_string()),
        (LABEL_BACKEND_NAME.to_string(), backend.to_string()),
    ]);
    let port_key = format!("{CONTAINER_PORT}/tcp");
    let limits = &spec.resource_limits;
    let cpu_period = limits.cpu_period.unwrap_or(crate::model::DEFAULT_CPU_PERIOD);
    let host_config = HostConfig {
        port_bindings: Some(HashMap::from([(
            port_key.clone(),
            Some(vec![PortBinding {
                host_ip: None,
                host_port: None,
            }]),
        )])),
        memory: limits.memory_limit_bytes,
        // Swap capped to the memory limit: a backend cannot swap past it.
        memory_swap: limits.memory_limit_bytes,
        cpu_period: limits
            .cpu_period_percent
            .or(limits.cpu_period)
            .map(|_| cpu_period),
        cpu_quota: limits.cpu_quota(),
        ulimits: limits.cpu_time_limit.map(|seconds| {
            vec![ResourcesUlimits {
                name: Some("cpu".to_string()),
                soft: Some(seconds),
                hard: Some(seconds),
            }]
        }),
        storage_opt: limits
            .disk_limit_bytes
            .map(|bytes| HashMap::from([("size".to_string(), bytes.to_string())])),
        binds: options
            .mount
            .as_ref()
            .map(|path| vec![format!("{}:/plane-data", path.display())]),
        network_mode: spec.network_name.clone(),
        runtime: options.runtime.clone(),
        log_config: options
            .log_driver
            .as_ref()
            .map(|(driver, config)| bollard::models::HostConfigLogConfig {
                typ: Some(driver.clone()),
                config: Some(config.clone()),
            }),
        ..Default::default()
    };
    ContainerConfig {
        image: Some(spec.image.clone()),
        env: Some(env),
        cmd: spec.command.clone(),
        labels: Some(labels),
        exposed_ports: Some(HashMap::from([(port_key, HashMap::new())])),
        host_config: Some(host_config),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_split_like_docker() {
        assert_eq!(split_tag("busybox"), ("busybox".into(), "latest".into()));
        assert_eq!(split_tag("a/b:1.2"), ("a/b".into(), "1.2".into()));
        assert_eq!(
            split_tag("localhost:5000/x"),
            ("localhost:5000/x".into(), "latest".into())
        );
        assert_eq!(
            split_tag("localhost:5000/x:v1"),
            ("localhost:5000/x".into(), "v1".into())
        );
    }

    #[test]
    fn timestamps_round_trip() {
        assert_eq!(docker_timestamp(1_700_000_000_123_456_789), "1700000000.123456789");
        assert_eq!(parse_docker_time("0001-01-01T00:00:00Z"), None);
        assert_eq!(
            parse_docker_time("2024-01-01T00:00:00.5Z"),
            Some(1_704_067_200_500)
        );
    }

    /// A stats answer as Docker 20.10 gives it, around a `memory_stats` value.
    fn stats_answer(memory_stats: serde_json::Value, cpu: serde_json::Value) -> Stats {
        serde_json::from_value(serde_json::json!({
            "read": "2026-01-01T00:00:00.5Z",
            "preread": "0001-01-01T00:00:00Z",
            "pids_stats": {"current": 1},
            "blkio_stats": {"io_service_bytes_recursive": null, "io_serviced_recursive": null,
                "io_queue_recursive": null, "io_service_time_recursive": null,
                "io_wait_time_recursive": null, "io_merged_recursive": null,
                "io_time_recursive": null, "sectors_recursive": null},
            "num_procs": 0,
            "storage_stats": {},
            "cpu_stats": cpu,
            "precpu_stats": {"cpu_usage": {"total_usage": 0, "usage_in_kernelmode": 0, "usage_in_usermode": 0},
                "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0}},
            "memory_stats": memory_stats,
            "name": "/plane-ba-x",
            "id": "abc"
        }))
        .expect("stats deserialize")
    }

    fn running_cpu() -> serde_json::Value {
        serde_json::json!({
            "cpu_usage": {"total_usage": 44_609_978u64, "usage_in_kernelmode": 0, "usage_in_usermode": 30_000_000u64},
            "system_cpu_usage": 1_790_920_000_000u64,
            "online_cpus": 2,
            "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0}
        })
    }

    #[test]
    fn stats_of_cgroup_v1_follow_plane() {
        let stats = stats_answer(
            serde_json::json!({
                "usage": 2_088_960u64, "max_usage": 4_079_616u64, "limit": 25_276_071_936u64,
                "stats": {
                    "active_anon": 4096, "active_file": 0, "cache": 1507328, "dirty": 0,
                    "hierarchical_memory_limit": 9223372036854771712u64,
                    "hierarchical_memsw_limit": 9223372036854771712u64,
                    "inactive_anon": 49152, "inactive_file": 1507328, "mapped_file": 1138688,
                    "pgfault": 1139, "pgmajfault": 20, "pgpgin": 1214, "pgpgout": 833, "rss": 53248,
                    "rss_huge": 0, "total_active_anon": 4096, "total_active_file": 8192,
                    "total_cache": 1507328, "total_dirty": 0, "total_inactive_anon": 49152,
                    "total_inactive_file": 1507328, "total_mapped_file": 1138688,
                    "total_pgfault": 1139, "total_pgmajfault": 20, "total_pgpgin": 1214,
                    "total_pgpgout": 833, "total_rss": 53248, "total_rss_huge": 0,
                    "total_unevictable": 4096, "total_writeback": 0, "unevictable": 0, "writeback": 0
                }
            }),
            running_cpu(),
        );
        assert_eq!(
            container_stats(&stats),
            Some(ContainerStats {
                mem_total: 53248 + 1507328,
                mem_used: 2_088_960 - 1507328,
                mem_active: 4096 + 8192,
                mem_inactive: 49152 + 1507328,
                mem_unevictable: 4096,
                mem_limit: 25_276_071_936,
                cpu_total_ns: 44_609_978,
                system_cpu_ns: 1_790_920_000_000,
            })
        );
    }

    #[test]
    fn stats_of_cgroup_v2_follow_plane() {
        let stats = stats_answer(
            serde_json::json!({
                "usage": 6_651_904u64, "limit": 8_303_472_640u64,
                "stats": {
                    "active_anon": 4096, "active_file": 1318912, "anon": 2154496, "anon_thp": 0,
                    "file": 3784704, "file_dirty": 0, "file_mapped": 2838528, "file_writeback": 0,
                    "inactive_anon": 2150400, "inactive_file": 2465792, "kernel_stack": 16384,
                    "pgactivate": 322, "pgdeactivate": 0, "pgfault": 1595, "pglazyfree": 0,
                    "pglazyfreed": 0, "pgmajfault": 30, "pgrefill": 0, "pgscan": 0, "pgsteal": 0,
                    "shmem": 0, "slab": 412520, "slab_reclaimable": 181104,
                    "slab_unreclaimable": 231416, "sock": 8192, "thp_collapse_alloc": 0,
                    "thp_fault_alloc": 0, "unevictable": 0, "workingset_activate": 0,
                    "workingset_nodereclaim": 0, "workingset_refault": 0
                }
            }),
            running_cpu(),
        );
        let read = container_stats(&stats).expect("a running container has stats");
        assert_eq!(read.mem_total, 2154496 + 3784704 + 16384 + 8192 + 412520);
        assert_eq!(read.mem_used, 6_651_904 - 2465792);
        assert_eq!(read.mem_active, 4096 + 1318912);
        assert_eq!(read.mem_inactive, 2150400 + 2465792);
        assert_eq!(read.mem_limit, 8_303_472_640);
        assert_eq!(read.cpu_total_ns, 44_609_978);
    }

    #[test]
    fn stats_of_a_stopped_container_are_none() {
        let stats = stats_answer(
            serde_json::json!({}),
            serde_json::json!({
                "cpu_usage": {"total_usage": 0, "usage_in_kernelmode": 0, "usage_in_usermode": 0},
                "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0}
            }),
        );
        assert_eq!(container_stats(&stats), None);
    }

    #[test]
    fn container_gets_plane_env_labels_and_limits() {
        let backend = BackendName::parse("ba-x").unwrap();
        let spec = ExecutorSpec::from_json(serde_json::json!({
            "image": "img",
            "env": {"A": "1"},
            "resource_limits": {"cpu_period_percent": 50, "memory_limit_bytes": 8388608, "cpu_time_limit": 10}
        }))
        .unwrap();
        let config = container_config(&backend, &spec, &ContainerOptions::default(), "dr-1");
        let env = config.env.unwrap();
        assert!(env.contains(&"PORT=8080".to_string()));
        assert!(env.contains(&"SESSION_BACKEND_ID=ba-x".to_string()));
        assert!(env.contains(&"A=1".to_string()));
        let labels = config.labels.unwrap();
        assert_eq!(labels[LABEL_PLANE_BACKEND], "true");
        assert_eq!(labels[LABEL_INSTANCE], "dr-1");
        let host = config.host_config.unwrap();
        assert_eq!(host.memory, Some(8388608));
        assert_eq!(host.memory_swap, Some(8388608));
        assert_eq!(host.cpu_period, Some(100_000));
        assert_eq!(host.cpu_quota, Some(50_000));
        assert_eq!(host.ulimits.unwrap()[0].soft, Some(10));
    }
}
