//! The runtime facade: the trait Plane's drone drives its Docker runtime
//! through ([`Runtime`]), implemented on top of the persistent reconciler
//! ([`DroverRuntime`]).
//!
//! Every call goes through the store: `spawn` writes the backend's desired
//! state and then waits for the reconciler to record its container, `terminate`
//! writes a termination request, `wait_for_backend` waits for the row to turn
//! ready, and `events` reads the exits recorded in `backend_events`. The facade
//! never calls Docker itself, so there is one writer of container state (the
//! reconciler) and what the facade reports is what the tables hold. Waits are
//! woken by the store's history watch, never by a timer.

use crate::config::Config;
use crate::daemon::Background;
use crate::docker::{DockerClient, DockerError};
use crate::model::{
    now_millis, BackendName, BackendRow, BackendState, BackendStatus, ExecutorSpec, MountSpec,
    SpecError, TerminationKind, TerminationReason,
};
use crate::store::{
    CreateOutcome, HistoryFollower, Launch, LaunchKey, Store, StoreError, TerminateOutcome,
};
use futures::stream::{BoxStream, StreamExt};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Component, Path};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A spawn argument is invalid; the error names the field.
    #[error(transparent)]
    Invalid(#[from] SpecError),
    #[error("backend {0} exists with a different executable or key")]
    Conflict(BackendName),
    /// The backend ended before its container was started.
    #[error("backend {backend} terminated before it started: {detail}")]
    Terminated {
        backend: BackendName,
        reason: Option<TerminationReason>,
        exit_code: Option<i32>,
        detail: String,
    },
    #[error("event id {0} is not in history yet")]
    AckAhead(i64),
    #[error("the runtime has been shut down")]
    ShutDown,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Docker(#[from] DockerError),
}

/// Why a backend did not become ready, as Plane's `BackendError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("backend did not answer before its startup timeout")]
    StartupTimeout,
    #[error("{0}")]
    Other(String),
}

/// A key as Plane names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyConfig {
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub tag: String,
}

/// A key the backend holds, with the fencing token of this holding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquiredKey {
    pub key: KeyConfig,
    pub token: i64,
}

/// What `spawn` reports once the container runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnResult {
    /// Docker's full container id.
    pub container_id: String,
    /// The host port published for the backend's port.
    pub port: u16,
}

/// A backend's end, as Plane's `TerminateEvent`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminateEvent {
    pub backend_id: BackendName,
    /// `None` when no exit code is known (lost, never started, internal error).
    pub exit_code: Option<i32>,
}

/// A [`TerminateEvent`] with its place in history, to resume or acknowledge from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedExit {
    pub event_id: i64,
    pub event: TerminateEvent,
}

/// One resource sample of a running backend, as Plane's `BackendMetricsMessage`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendMetricsMessage {
    pub backend_id: BackendName,
    pub mem_total: u64,
    pub mem_used: u64,
    pub mem_active: u64,
    pub mem_inactive: u64,
    pub mem_unevictable: u64,
    pub mem_limit: u64,
    pub cpu_used: u64,
    pub sys_cpu: u64,
}

type MetricsCallback = Arc<dyn Fn(BackendMetricsMessage) + Send + Sync>;

/// The receivers of metrics samples: `metrics_callback` adds one, the
/// sampler publishes each sample it appends to every one of them.
#[derive(Clone, Default)]
pub struct MetricsSubscribers {
    /// std Mutex, not tokio's: held only to copy the list, never across a call.
    callbacks: Arc<Mutex<Vec<MetricsCallback>>>,
}

impl MetricsSubscribers {
    pub fn subscribe(&self, callback: Box<dyn Fn(BackendMetricsMessage) + Send + Sync>) {
        self.callbacks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Arc::from(callback));
    }

    /// Hands `message` to every receiver, outside the lock.
    pub fn publish(&self, message: BackendMetricsMessage) {
        let callbacks = self
            .callbacks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        for callback in callbacks {
            callback(message.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.callbacks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_empty()
    }
}

impl std::fmt::Debug for MetricsSubscribers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self
            .callbacks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len();
        f.debug_struct("MetricsSubscribers").field("count", &count).finish()
    }
}

/// Plane's drone runtime interface.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Checks that `executable` can be spawned. Plane pulls the image here;
    /// drover only validates, because the image is the reconciler's to pull
    /// (per the spec's pull policy) when the backend is spawned.
    async fn prepare(&self, executable: &serde_json::Value) -> Result<()>;

    /// Schedules the backend and waits until its container runs; its exit
    /// before that is an error. Spawning an existing id with the same
    /// executable and key waits for that backend.
    async fn spawn(
        &self,
        backend_id: &BackendName,
        executable: serde_json::Value,
        key: Option<AcquiredKey>,
        static_token: Option<String>,
    ) -> Result<SpawnResult>;

    /// Requests termination (`hard`: SIGKILL now). `Ok(false)` when the
    /// backend is unknown or already terminated.
    async fn terminate(&self, backend_id: &BackendName, hard: bool) -> Result<bool>;

    /// Registers a receiver of every metrics sample taken from now on.
    fn metrics_callback(&self, callback: Box<dyn Fn(BackendMetricsMessage) + Send + Sync + 'static>);

    /// Every backend's end, in the order recorded, each once per stream.
    fn events(&self) -> BoxStream<'static, TerminateEvent>;

    /// Waits until the backend is ready. `address` is the one `spawn`
    /// reported; readiness itself is probed by the reconciler.
    async fn wait_for_backend(
        &self,
        backend_id: &BackendName,
        address: SocketAddr,
    ) -> Result<(), BackendError>;
}

/// drover as an in-process runtime: a store, the reconciler in a background
/// task, and the facade over them.
pub struct DroverRuntime {
    store: Store,
    config: Arc<Config>,
    metrics: MetricsSubscribers,
    /// The newest history row when the runtime started: [`Runtime::events`]
    /// streams start after it, so exits recorded by the boot pass (for
    /// containers that ended while nothing ran) reach them too.
    started_after: i64,
    /// Turns `true` (or closes) when the runtime shuts down; ends waits and streams.
    stop: watch::Receiver<bool>,
    background: tokio::sync::Mutex<Option<Background>>,
}

impl DroverRuntime {
    /// Opens the store, connects to Docker and starts the reconciler, exactly
    /// as `drover serve` does, but without the HTTP API.
    pub async fn start(config: Config) -> Result<DroverRuntime> {
        let store = Store::open(&config.db_path).await?;
        let docker = DockerClient::connect(store.instance_id()).await?;
        let started_after = store.last_event_id().await?;
        let background = Background::start(&config, &store, &docker);
        tracing::info!(
            instance = store.instance_id(),
            db = %config.db_path.display(),
            docker = docker.endpoint(),
            "drover runtime started"
        );
        Ok(DroverRuntime {
            store,
            config: Arc::new(config),
            metrics: background.metrics.clone(),
            started_after,
            stop: background.stop_signal(),
            background: tokio::sync::Mutex::new(Some(background)),
        })
    }

    /// Stops the reconciler and closes the store. Containers keep running;
    /// the next start adopts them. Streams and waits end.
    pub async fn shutdown(&self) {
        if let Some(background) = self.background.lock().await.take() {
            background.stop().await;
            self.store.close().await;
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn instance_id(&self) -> &str {
        self.store.instance_id()
    }

    /// Where the sampler publishes: the receivers `metrics_callback` registered.
    pub fn metrics_subscribers(&self) -> MetricsSubscribers {
        self.metrics.clone()
    }

    /// The id of the newest history row, to resume from later.
    pub async fn last_event_id(&self) -> Result<i64> {
        Ok(self.store.last_event_id().await?)
    }

    /// Every backend's end recorded after `event_id`, then each new one as
    /// it is recorded, until the runtime shuts down.
    pub fn exits_after(&self, event_id: i64) -> BoxStream<'static, RecordedExit> {
        self.store
            .follow_exits(event_id, self.stop.clone())
            .filter_map(|item| async move {
                match item {
                    Ok(row) => Some(RecordedExit {
                        event_id: row.event_id,
                        event: TerminateEvent {
                            backend_id: row.backend_id,
                            exit_code: row.exit_code,
                        },
                    }),
                    Err(error) => {
                        // The follower tries the read again; nothing is skipped.
                        tracing::warn!(%error, "cannot read exits; retrying");
                        None
                    }
                }
            })
            .boxed()
    }

    /// A named consumer of exits: resumes after the last event it
    /// acknowledged (from the start of history the first time), so across
    /// restarts it receives every exit at least once.
    pub async fn subscribe(&self, name: &str) -> Result<Subscription> {
        if name.is_empty() || name.len() > 200 {
            return Err(SpecError::new("subscription", "name must have 1 to 200 characters").into());
        }
        let acked = self.store.open_subscription(name, now_millis()).await?;
        Ok(Subscription {
            name: name.to_string(),
            store: self.store.clone(),
            acked,
            exits: self.exits_after(acked),
        })
    }

    /// Parses the spec and checks it against this runtime's configuration.
    fn validate(&self, executable: serde_json::Value, key: Option<&AcquiredKey>) -> Result<ExecutorSpec> {
        let spec = ExecutorSpec::from_json(executable)?;
        let mount_base = self.config.docker.mount_base.as_deref();
        match &spec.mount {
            Some(MountSpec::Flag(true)) => {
                mount_base.ok_or_else(mounts_disabled)?;
                if let Some(key) = key {
                    validate_key_folder(&key.key.name)?;
                }
            }
            Some(MountSpec::Path(path)) => {
                let base = mount_base.ok_or_else(mounts_disabled)?;
                crate::mounts::verify(base, path)
                    .map_err(|e| SpecError::new("executable.mount", e.to_string()))?;
            }
            _ => {}
        }
        Ok(spec)
    }

    /// Waits until the backend's container runs (its port is known) or it ends.
    async fn wait_started(&self, id: &BackendName) -> Result<SpawnResult> {
        let mut follower = HistoryFollower::new(&self.store, self.stop.clone());
        loop {
            follower.mark_seen();
            let row = self.load(id).await?;
            match &row.state {
                BackendState::Terminated {
                    reason, exit_code, ..
                } => {
                    return Err(RuntimeError::Terminated {
                        backend: id.clone(),
                        reason: *reason,
                        exit_code: *exit_code,
                        detail: describe_end(&row),
                    })
                }
                BackendState::Waiting { address } | BackendState::Ready { address: Some(address) } => {
                    if let Some(started) = spawn_result(&row, address) {
                        return Ok(started);
                    }
                }
                BackendState::Terminating { .. } | BackendState::HardTerminating { .. } => {
                    // Terminated right after it started: its address is in history.
                    let events = self.store.events_for(id).await?;
                    let address = events.iter().find_map(|e| {
                        (e.status == BackendStatus::Waiting.as_str())
                            .then(|| e.state.get("address")?.as_str().map(str::to_string))
                            .flatten()
                    });
                    if let Some(started) = address.and_then(|a| spawn_result(&row, &a)) {
                        return Ok(started);
                    }
                }
                _ => {}
            }
            if !follower.wait(None).await {
                return Err(RuntimeError::ShutDown);
            }
        }
    }

    async fn load(&self, id: &BackendName) -> Result<BackendRow> {
        self.store.get_backend(id).await?.ok_or_else(|| {
            RuntimeError::Store(StoreError::Corrupt(format!("backend {id} vanished")))
        })
    }
}

impl Drop for DroverRuntime {
    fn drop(&mut self) {
        // Without an explicit shutdown the tasks still stop, on their own time.
        if let Some(background) = self.background.get_mut() {
            background.request_stop();
        }
    }
}

#[async_trait::async_trait]
impl Runtime for DroverRuntime {
    async fn prepare(&self, executable: &serde_json::Value) -> Result<()> {
        self.validate(executable.clone(), None)?;
        Ok(())
    }

    async fn spawn(
        &self,
        backend_id: &BackendName,
        executable: serde_json::Value,
        key: Option<AcquiredKey>,
        static_token: Option<String>,
    ) -> Result<SpawnResult> {
        let spec = self.validate(executable, key.as_ref())?;
        if matches!(spec.mount, Some(MountSpec::Flag(true))) && key.is_none() {
            return Err(SpecError::new("executable.mount", "true needs a key to name the folder").into());
        }
        if let Some(key) = &key {
            if key.key.name.is_empty() || key.key.name.contains('\0') {
                return Err(SpecError::new("key.name", "must be non-empty and without NUL").into());
            }
        }
        if static_token.as_deref().is_some_and(|t| t.contains('\0')) {
            return Err(SpecError::new("static_token", "must not contain NUL").into());
        }
        let launch = Launch {
            key: key.map(|acquired| LaunchKey {
                name: acquired.key.name,
                namespace: acquired.key.namespace,
                tag: acquired.key.tag,
                fencing_token: acquired.token,
            }),
            static_token,
        };
        match self
            .store
            .create_backend(backend_id, &spec, Some(&launch), now_millis())
            .await?
        {
            CreateOutcome::Created(_) | CreateOutcome::Existing(_) => {}
            CreateOutcome::Conflict(_) => return Err(RuntimeError::Conflict(backend_id.clone())),
        }
        self.wait_started(backend_id).await
    }

    async fn terminate(&self, backend_id: &BackendName, hard: bool) -> Result<bool> {
        let kind = if hard {
            TerminationKind::Hard
        } else {
            TerminationKind::Soft
        };
        let outcome = self
            .store
            .request_termination(backend_id, kind, TerminationReason::External, now_millis())
            .await?;
        Ok(matches!(outcome, TerminateOutcome::Requested(_)))
    }

    fn metrics_callback(&self, callback: Box<dyn Fn(BackendMetricsMessage) + Send + Sync + 'static>) {
        self.metrics.subscribe(callback);
    }

    /// Starts after the history head at [`DroverRuntime::start`]; use
    /// [`DroverRuntime::exits_after`] or [`DroverRuntime::subscribe`] to
    /// resume from a given event.
    fn events(&self) -> BoxStream<'static, TerminateEvent> {
        self.exits_after(self.started_after)
            .map(|exit| exit.event)
            .boxed()
    }

    async fn wait_for_backend(
        &self,
        backend_id: &BackendName,
        address: SocketAddr,
    ) -> Result<(), BackendError> {
        let mut follower = HistoryFollower::new(&self.store, self.stop.clone());
        loop {
            follower.mark_seen();
            let row = self
                .store
                .get_backend(backend_id)
                .await
                .map_err(|e| BackendError::Other(e.to_string()))?
                .ok_or_else(|| BackendError::Other(format!("no backend {backend_id}")))?;
            match readiness(&row.state) {
                Some(Readiness::Ready) => {
                    if row.state.address().is_some_and(|a| a != address.to_string()) {
                        tracing::debug!(backend = %backend_id, %address, recorded = ?row.state.address(), "backend ready at another address");
                    }
                    return Ok(());
                }
                Some(Readiness::StartupTimeout) => return Err(BackendError::StartupTimeout),
                Some(Readiness::Ended) => {
                    return Err(BackendError::Other(format!(
                        "backend {backend_id} ended before it was ready: {}",
                        describe_end(&row)
                    )))
                }
                None => {}
            }
            if !follower.wait(None).await {
                return Err(BackendError::Other("the runtime has been shut down".into()));
            }
        }
    }
}

/// How a state settles `wait_for_backend`, if it does.
#[derive(Debug, PartialEq, Eq)]
enum Readiness {
    /// Ready, or terminating after it was ready.
    Ready,
    StartupTimeout,
    /// Ended without being ready, for another reason.
    Ended,
}

fn readiness(state: &BackendState) -> Option<Readiness> {
    match state {
        BackendState::Ready { .. } => Some(Readiness::Ready),
        BackendState::Terminating { reason, .. } | BackendState::HardTerminating { reason, .. }
            if *reason == TerminationReason::StartupTimeout =>
        {
            Some(Readiness::StartupTimeout)
        }
        BackendState::Terminated {
            reason: Some(TerminationReason::StartupTimeout),
            ..
        } => Some(Readiness::StartupTimeout),
        BackendState::Terminating { last_status, .. }
        | BackendState::HardTerminating { last_status, .. }
        | BackendState::Terminated { last_status, .. } => {
            if *last_status == BackendStatus::Ready {
                Some(Readiness::Ready)
            } else if state.status() == BackendStatus::Terminated {
                Some(Readiness::Ended)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// The backend's container id and published port, once both are recorded.
fn spawn_result(row: &BackendRow, address: &str) -> Option<SpawnResult> {
    let container_id = row.container_id.clone()?;
    let port = address
        .parse::<SocketAddr>()
        .map(|a| a.port())
        .ok()
        .or_else(|| address.rsplit(':').next()?.parse().ok())?;
    Some(SpawnResult { container_id, port })
}

/// A short account of how a backend ended, for errors.
fn describe_end(row: &BackendRow) -> String {
    let mut parts = Vec::new();
    match &row.state {
        BackendState::Terminated {
            reason, exit_code, ..
        } => {
            parts.extend(reason.map(|reason| format!("reason {}", reason.as_str())));
            parts.extend(exit_code.map(|code| format!("exit code {code}")));
        }
        other => parts.push(other.status().to_string()),
    }
    parts.extend(row.error.clone());
    if parts.is_empty() {
        parts.push("terminated".to_string());
    }
    parts.join(", ")
}

fn mounts_disabled() -> SpecError {
    SpecError::new(
        "executable.mount",
        "mounts are disabled (docker.mount_base is not configured)",
    )
}

/// With `mount: true` the key name is the folder under the mount base: it
/// must be one plain path component, so it can neither nest nor leave the base.
fn validate_key_folder(name: &str) -> Result<(), SpecError> {
    let mut components = Path::new(name).components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(_)), None) if !name.contains('/') => Ok(()),
        _ => Err(SpecError::new(
            "key.name",
            format!("{name:?} cannot name a mount folder (one path component, not '.' or '..')"),
        )),
    }
}

/// A named consumer of exits; see [`DroverRuntime::subscribe`].
pub struct Subscription {
    name: String,
    store: Store,
    acked: i64,
    exits: BoxStream<'static, RecordedExit>,
}

impl Subscription {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The last event acknowledged (when opened, or by [`Self::ack`] since).
    pub fn acked(&self) -> i64 {
        self.acked
    }

    /// The next exit after the ones handed out; `None` once the runtime shut down.
    pub async fn next(&mut self) -> Option<RecordedExit> {
        self.exits.next().await
    }

    /// Records that every exit up to `event_id` has been handled; after a
    /// restart the subscription resumes after it. Never moves backwards.
    pub async fn ack(&mut self, event_id: i64) -> Result<()> {
        if !self
            .store
            .ack_subscription(&self.name, event_id, now_millis())
            .await?
        {
            return Err(RuntimeError::AckAhead(event_id));
        }
        self.acked = self.acked.max(event_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_that_would_leave_or_be_the_mount_base_are_refused() {
        assert!(validate_key_folder("session-1").is_ok());
        for bad in ["", ".", "..", "a/b", "/abs", "../x"] {
            let err = validate_key_folder(bad).unwrap_err();
            assert_eq!(err.field, "key.name", "{bad:?}");
        }
    }

    #[test]
    fn readiness_tells_ready_from_timeout_from_other_ends() {
        let ready = BackendState::Ready { address: None };
        assert_eq!(readiness(&ready), Some(Readiness::Ready));
        let waiting = BackendState::Waiting { address: "a:1".into() };
        let timed_out = waiting.to_hard_terminating(TerminationReason::StartupTimeout);
        assert_eq!(readiness(&timed_out), Some(Readiness::StartupTimeout));
        assert_eq!(
            readiness(&timed_out.to_terminated(None, Some(137))),
            Some(Readiness::StartupTimeout)
        );
        let lost = BackendState::Terminated {
            last_status: BackendStatus::Waiting,
            termination: None,
            reason: Some(TerminationReason::Lost),
            exit_code: None,
        };
        assert_eq!(readiness(&lost), Some(Readiness::Ended));
        assert_eq!(
            readiness(&ready.to_terminating(TerminationReason::External)),
            Some(Readiness::Ready)
        );
        assert_eq!(
            readiness(&BackendState::Loading.to_terminating(TerminationReason::External)),
            None
        );
        assert_eq!(readiness(&BackendState::Starting), None);
    }

    #[test]
    fn metrics_reach_every_subscriber() {
        let subscribers = MetricsSubscribers::default();
        assert!(subscribers.is_empty());
        let seen = Arc::new(Mutex::new(Vec::new()));
        for n in 0..2 {
            let seen = seen.clone();
            subscribers.subscribe(Box::new(move |m: BackendMetricsMessage| {
                seen.lock().unwrap().push((n, m.mem_used))
            }));
        }
        subscribers.publish(BackendMetricsMessage {
            backend_id: BackendName::parse("ba-m").unwrap(),
            mem_total: 1,
            mem_used: 7,
            mem_active: 0,
            mem_inactive: 0,
            mem_unevictable: 0,
            mem_limit: 0,
            cpu_used: 0,
            sys_cpu: 0,
        });
        assert_eq!(*seen.lock().unwrap(), [(0, 7), (1, 7)]);
    }
}
