//! Performs one planned [`Action`] for one backend, through the Docker adapter
//! and the store.
//!
//! It decides nothing the planner could decide: it only carries an action out
//! in a crash-safe order (intent written before the Docker call where a
//! restart must know of it; every step idempotent) and reports what it learned
//! of the container so the reconciler's picture stays current. Named crash
//! points mark each step, so tests can kill the process between any two.

use crate::config::Config;
use crate::crash;
use crate::docker::{ContainerOptions, DockerClient, DockerError, InspectedContainer};
use crate::model::{
    now_millis, BackendName, BackendRow, BackendState, BackendStatus, Desired, EventSource,
    Millis, MountSpec, ObservedContainer, ObservedExit, PullPolicy, RunState, Signal,
    TerminationKind, TerminationReason,
};
use crate::planner::Action;
use crate::store::{Launch, Store, StoreError, Transition};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What performing an action taught us, for the reconciler's picture.
#[derive(Debug)]
pub struct ActionOutcome {
    pub backend: BackendName,
    pub container: ContainerUpdate,
    /// Try this backend again no sooner than this (a transient failure).
    pub retry_after: Option<Duration>,
    /// The failure was Docker being unreachable.
    pub docker_unavailable: bool,
}

#[derive(Debug)]
pub enum ContainerUpdate {
    Unchanged,
    Observed(ObservedContainer),
    Gone,
}

/// Settings the executor needs from the configuration.
#[derive(Clone, Debug)]
pub struct ExecutorSettings {
    pub advertise_ip: std::net::IpAddr,
    pub soft_terminate_grace: Duration,
    pub startup_timeout: Duration,
    pub mount_base: Option<PathBuf>,
    pub runtime: Option<String>,
    pub log_driver: Option<(String, std::collections::HashMap<String, String>)>,
}

impl ExecutorSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            advertise_ip: config.advertise_ip,
            soft_terminate_grace: config.reconcile.soft_terminate_grace,
            startup_timeout: config.reconcile.startup_timeout,
            mount_base: config.docker.mount_base.clone(),
            runtime: config.docker.runtime.clone(),
            log_driver: config
                .docker
                .log_config
                .as_ref()
                .map(|l| (l.driver.clone(), l.config.clone().into_iter().collect())),
        }
    }
}

#[derive(Clone)]
pub struct Executor {
    pub store: Store,
    pub docker: DockerClient,
    pub settings: ExecutorSettings,
}

/// Why an action stopped before its end.
enum Failure {
    /// Docker or the store is unreachable: try again later, change nothing.
    Transient(String, bool),
    /// Docker refused: the backend cannot run. Recorded as `internalerror`.
    Fatal(String),
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Failure::Transient(error.to_string(), false)
    }
}

impl From<DockerError> for Failure {
    fn from(error: DockerError) -> Self {
        match error {
            DockerError::Unavailable { .. } => Failure::Transient(error.to_string(), true),
            other => Failure::Fatal(other.to_string()),
        }
    }
}

const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(500);

/// How far back Docker's event log is searched for the `die` of a container
/// that vanished.
const RECENT_EXIT_WINDOW: Duration = Duration::from_secs(600);

/// How often, at most, a pull's progress is written as the loading detail.
pub const LOADING_DETAIL_EVERY: Duration = Duration::from_secs(1);

impl Executor {
    /// Performs `action` for `row`. Never panics on Docker or store errors:
    /// transient ones come back as a retry, refusals end the backend.
    pub async fn perform(&self, row: BackendRow, action: Action) -> ActionOutcome {
        let backend = row.id.clone();
        match self.perform_inner(&row, action).await {
            Ok(container) => ActionOutcome {
                backend,
                container,
                retry_after: None,
                docker_unavailable: false,
            },
            Err(Failure::Transient(message, docker_unavailable)) => {
                tracing::warn!(backend = %backend, error = %message, "action failed, will retry");
                ActionOutcome {
                    backend,
                    container: ContainerUpdate::Unchanged,
                    retry_after: Some(RETRY_AFTER_FAILURE),
                    docker_unavailable,
                }
            }
            Err(Failure::Fatal(message)) => {
                tracing::warn!(backend = %backend, error = %message, "backend cannot run");
                // Re-read: the action may have moved the backend on before failing.
                let current = match self.store.get_backend(&backend).await {
                    Ok(Some(current)) => current,
                    _ => row,
                };
                let retry_after = match self.record_internal_error(&current, &message).await {
                    Ok(()) => None,
                    Err(_) => Some(RETRY_AFTER_FAILURE),
                };
                ActionOutcome {
                    backend,
                    container: ContainerUpdate::Unchanged,
                    retry_after,
                    docker_unavailable: false,
                }
            }
        }
    }

    async fn perform_inner(&self, row: &BackendRow, action: Action) -> Result<ContainerUpdate, Failure> {
        match action {
            Action::PrepareImage => self.prepare_image(row).await,
            Action::CreateContainer => self.create_container(row).await,
            Action::StartContainer { container_id } => {
                if !self.start(row, &container_id).await? {
                    return Ok(ContainerUpdate::Gone);
                }
                crash::point("after_start");
                self.record_waiting(row, &container_id).await
            }
            Action::AdoptRunning { container_id, .. } => {
                self.record_waiting(row, &container_id).await
            }
            Action::Probe {
                address, deadline, ..
            } => self.probe(row, &address, deadline).await,
            Action::BeginSoftTermination {
                container_id,
                reason,
            } => {
                let now = now_millis();
                let mut transition = Transition::new(
                    row.state.to_terminating(reason),
                    EventSource::Reconciler,
                    now,
                );
                transition.kill_deadline =
                    Some(now + self.settings.soft_terminate_grace.as_millis() as Millis);
                if self.store.record_transition(&row.id, row.status(), &transition).await? {
                    crash::point("after_terminating_recorded");
                    self.signal(&row.id, &container_id, Signal::Term).await?;
                }
                Ok(ContainerUpdate::Unchanged)
            }
            Action::BeginHardTermination {
                container_id,
                reason,
            } => {
                let mut transition = Transition::new(
                    row.state.to_hard_terminating(reason),
                    EventSource::Reconciler,
                    now_millis(),
                );
                transition.requested_termination = Some((TerminationKind::Hard, reason));
                if self.store.record_transition(&row.id, row.status(), &transition).await? {
                    crash::point("after_hard_terminating_recorded");
                    self.signal(&row.id, &container_id, Signal::Kill).await?;
                }
                Ok(ContainerUpdate::Unchanged)
            }
            Action::Signal {
                container_id,
                signal,
            } => {
                self.signal(&row.id, &container_id, signal).await?;
                Ok(ContainerUpdate::Unchanged)
            }
            Action::RecordExit { container_id, exit } => {
                let (exit, update) = match exit {
                    // A `die` event is dated when Docker logged it, a little
                    // after the exit (and when replayed, at no other time):
                    // the container, while it is still there, gives its own
                    // `FinishedAt`. Unreachable, the event's time will do.
                    Some(exit) => match self.docker.inspect(&container_id).await {
                        Ok(Some(inspected)) if inspected.run_state != RunState::Exited => {
                            return Ok(ContainerUpdate::Observed(observed_from(row, inspected)));
                        }
                        Ok(Some(InspectedContainer {
                            exit: Some(inspected),
                            ..
                        })) => (
                            Some(ObservedExit {
                                finished_at: inspected.finished_at,
                                oom_killed: exit.oom_killed || inspected.oom_killed,
                                ..exit
                            }),
                            ContainerUpdate::Unchanged,
                        ),
                        _ => (Some(exit), ContainerUpdate::Unchanged),
                    },
                    None => match self.docker.inspect(&container_id).await? {
                        None => (None, ContainerUpdate::Gone),
                        Some(inspected) if inspected.run_state != RunState::Exited => {
                            // Our picture was stale: it runs (or never ran).
                            return Ok(ContainerUpdate::Observed(observed_from(row, inspected)));
                        }
                        Some(inspected) => (inspected.exit, ContainerUpdate::Unchanged),
                    },
                };
                match exit {
                    Some(exit) => self.record_exit(row, Some(container_id), exit).await?,
                    None => self.record_gone(row, None).await?,
                }
                Ok(update)
            }
            Action::RecordGone { exit } => {
                self.record_gone(row, exit).await?;
                Ok(ContainerUpdate::Gone)
            }
            Action::RecordTerminatedUnstarted => {
                let state = row.state.to_terminated(requested(row), None);
                let transition = Transition::new(state, EventSource::Reconciler, now_millis());
                self.store.record_transition(&row.id, row.status(), &transition).await?;
                Ok(ContainerUpdate::Unchanged)
            }
            Action::RemoveUnstarted { container_id } => {
                // Forced: should a late `start` have won the race, the
                // container is killed (its `die` is then recorded as its exit).
                self.docker
                    .remove(&container_id, true)
                    .await
                    .map_err(|e| match e {
                        // "removal already in progress": it will be gone.
                        DockerError::Conflict(message) => Failure::Transient(message, false),
                        other => other.into(),
                    })?;
                Ok(ContainerUpdate::Gone)
            }
        }
    }

    async fn prepare_image(&self, row: &BackendRow) -> Result<ContainerUpdate, Failure> {
        let mut state = row.state.clone();
        if row.status() == BackendStatus::Scheduled {
            let transition =
                Transition::new(BackendState::Loading, EventSource::Reconciler, now_millis());
            if !self
                .store
                .record_transition(&row.id, BackendStatus::Scheduled, &transition)
                .await?
            {
                return Ok(ContainerUpdate::Unchanged);
            }
            crash::point("after_loading_recorded");
            state = BackendState::Loading;
        }
        let spec = &row.spec;
        let present = || self.docker.image_present(&spec.image);
        let must_pull = match spec.pull_policy() {
            PullPolicy::Always => true,
            PullPolicy::IfNotPresent => !present().await?,
            PullPolicy::Never => {
                if !present().await? {
                    return Err(Failure::Fatal(format!(
                        "image {} is not present and pull_policy is Never",
                        spec.image
                    )));
                }
                false
            }
        };
        let mut brings_image = false;
        if must_pull {
            // Whether this pull brings the image to the host, making it
            // drover's to prune later: IfNotPresent pulls only an absent
            // image; Always may refresh one someone else put there.
            brings_image = spec.pull_policy() != PullPolicy::Always
                || self.store.pulled_image(&spec.image).await?.is_some()
                || !present().await?;
            crash::point("before_pull");
            tracing::info!(backend = %row.id, image = %spec.image, "pulling image");
            self.pull_with_detail(row)
                .await
                .map_err(|e| match e {
                    DockerError::Unavailable { .. } => Failure::from(e),
                    other => Failure::Fatal(format!("pull of {} failed: {other}", spec.image)),
                })?;
            crash::point("after_pull");
        }
        // The pull ledger for prune (a crash before this line leaves the image
        // off it: never pruned, the safe side).
        crate::prune::record_image_use(&self.store, &self.docker, &spec.image, brings_image, now_millis())
            .await?;
        let transition = Transition::new(BackendState::Starting, EventSource::Reconciler, now_millis());
        self.store
            .record_transition(&row.id, state.status(), &transition)
            .await?;
        crash::point("after_starting_recorded");
        Ok(ContainerUpdate::Unchanged)
    }

    /// Pulls the backend's image, keeping its last progress line as the
    /// backend's loading detail: written at most once per
    /// [`LOADING_DETAIL_EVERY`] while pulling, and once at the end.
    async fn pull_with_detail(&self, row: &BackendRow) -> Result<(), DockerError> {
        let spec = &row.spec;
        // std Mutex, not tokio's: only touched by sync code, never across an await.
        let latest: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
        let mut written: Option<String> = None;
        let pull = self.docker.pull(&spec.image, spec.credentials.as_ref(), |line| {
            *latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(line.to_string());
        });
        tokio::pin!(pull);
        let mut ticker = tokio::time::interval(LOADING_DETAIL_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                result = &mut pull => break result,
                _ = ticker.tick() => self.write_loading_detail(&row.id, &latest, &mut written).await,
            }
        };
        self.write_loading_detail(&row.id, &latest, &mut written).await;
        result
    }

    /// Stores the latest progress line if it changed. Progress is cosmetic: a
    /// failed write is logged and the pull goes on.
    async fn write_loading_detail(
        &self,
        id: &BackendName,
        latest: &std::sync::Mutex<Option<String>>,
        written: &mut Option<String>,
    ) {
        let line = latest.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if line.is_none() || line == *written {
            return;
        }
        let line = line.unwrap_or_default();
        match self.store.set_loading_detail(id, &line).await {
            Ok(()) => *written = Some(line),
            Err(e) => tracing::debug!(backend = %id, error = %e, "cannot store loading detail"),
        }
    }

    async fn create_container(&self, row: &BackendRow) -> Result<ContainerUpdate, Failure> {
        // The key and static token are read here only: they never travel with the row.
        let launch = self.store.launch_of(&row.id).await?.unwrap_or_default();
        let options = self.container_options(row, &launch)?;
        let container_id = match self.docker.create(&row.id, &row.spec, &options).await {
            Ok(id) => id,
            Err(DockerError::Conflict(_)) => {
                // Created before a crash: adopt it rather than make a second one.
                return match self.docker.inspect(&row.id.container_name()).await? {
                    Some(inspected) => Ok(ContainerUpdate::Observed(observed_from(row, inspected))),
                    None => Err(Failure::Transient(
                        "container name taken but container not found".into(),
                        false,
                    )),
                };
            }
            Err(e) => return Err(container_failure("create", &row.spec, e)),
        };
        crash::point("after_create");
        if !self.start(row, &container_id).await? {
            return Ok(ContainerUpdate::Gone);
        }
        crash::point("after_start");
        self.record_waiting(row, &container_id).await
    }

    /// Starts the container; false when it no longer exists (the planner
    /// decides again from a fresh picture). A container Docker does not know
    /// yet (a create sent by a process killed mid-request is listed before
    /// Docker has finished it) is a transient failure, tried again shortly:
    /// neither is an error of the backend.
    async fn start(&self, row: &BackendRow, container_id: &str) -> Result<bool, Failure> {
        match self.docker.start(container_id).await {
            Ok(()) => Ok(true),
            Err(DockerError::NotFound(message)) => {
                // Docker answers "No such container" for a container whose
                // create is still under way (sent by a process killed
                // mid-request) although it already lists and inspects it:
                // try again shortly.
                if message.contains("No such container") {
                    return Err(Failure::Transient(format!("cannot start container yet: {message}"), false));
                }
                // A 404 may name something else the container needs (a network
                // removed or never made): that is the backend's error, not a
                // vanished container, or create and start would loop forever.
                if self.docker.inspect(container_id).await?.is_some() {
                    return Err(container_failure("start", &row.spec, DockerError::NotFound(message)));
                }
                tracing::info!(backend = %row.id, container_id, %message, "container to start not found");
                Ok(false)
            }
            Err(e) => Err(container_failure("start", &row.spec, e)),
        }
    }

    fn container_options(&self, row: &BackendRow, launch: &Launch) -> Result<ContainerOptions, Failure> {
        let mount = match &row.spec.mount {
            None | Some(MountSpec::Flag(false)) => None,
            Some(MountSpec::Flag(true)) => {
                // As Plane does: the folder is named after the key the backend holds.
                let key = launch.key.as_ref().ok_or_else(|| {
                    Failure::Fatal("mount: true needs a key to name the folder".into())
                })?;
                let base = self.settings.mount_base.as_ref().ok_or_else(|| {
                    Failure::Fatal("mount requested but docker.mount_base is not configured".into())
                })?;
                Some(
                    crate::mounts::prepare(base, std::path::Path::new(&key.name))
                        .map_err(|e| Failure::Fatal(e.to_string()))?,
                )
            }
            Some(MountSpec::Path(path)) => {
                let base = self.settings.mount_base.as_ref().ok_or_else(|| {
                    Failure::Fatal("mount requested but docker.mount_base is not configured".into())
                })?;
                Some(
                    crate::mounts::prepare(base, path)
                        .map_err(|e| Failure::Fatal(e.to_string()))?,
                )
            }
        };
        let mut extra_env = Vec::new();
        if let Some(key) = &launch.key {
            extra_env.push(("SESSION_BACKEND_KEY".to_string(), key.name.clone()));
            extra_env.push((
                "SESSION_BACKEND_FENCING_TOKEN".to_string(),
                key.fencing_token.to_string(),
            ));
        }
        if let Some(token) = &launch.static_token {
            extra_env.push(("SESSION_BACKEND_STATIC_TOKEN".to_string(), token.clone()));
        }
        Ok(ContainerOptions {
            extra_env,
            mount,
            runtime: self.settings.runtime.clone(),
            log_driver: self.settings.log_driver.clone(),
        })
    }

    /// Looks up the started container's port and records `waiting`. The
    /// startup deadline counts from the container's own start time, so a
    /// restart does not reset it.
    async fn record_waiting(&self, row: &BackendRow, container_id: &str) -> Result<ContainerUpdate, Failure> {
        let Some(inspected) = self.docker.inspect(container_id).await? else {
            return Ok(ContainerUpdate::Gone);
        };
        let observed = observed_from(row, inspected.clone());
        if inspected.run_state != RunState::Running {
            return Ok(ContainerUpdate::Observed(observed));
        }
        let Some(port) = inspected.host_port else {
            return Err(Failure::Fatal("container has no published port".into()));
        };
        let started_at = inspected
            .started_at
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_millis())
            .filter(|t| *t > 0)
            .unwrap_or_else(now_millis);
        let address = SocketAddr::new(self.settings.advertise_ip, port).to_string();
        let mut transition = Transition::new(
            BackendState::Waiting { address },
            EventSource::Reconciler,
            now_millis(),
        );
        transition.container_id = Some(inspected.container_id.clone());
        transition.startup_deadline =
            Some(started_at + self.settings.startup_timeout.as_millis() as Millis);
        self.store
            .record_transition(&row.id, row.status(), &transition)
            .await?;
        crash::point("after_waiting_recorded");
        Ok(ContainerUpdate::Observed(observed))
    }

    /// Probes until the backend answers HTTP or the deadline passes. Soon
    /// after start, then backing off, so a fast backend is seen at once.
    async fn probe(&self, row: &BackendRow, address: &str, deadline: Millis) -> Result<ContainerUpdate, Failure> {
        let port = address
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| Failure::Fatal(format!("bad backend address {address:?}")))?;
        let target = SocketAddr::from(([127, 0, 0, 1], port));
        let mut delay = Duration::from_millis(2);
        loop {
            if probe_http(target).await {
                let transition = Transition::new(
                    BackendState::Ready {
                        address: Some(address.to_string()),
                    },
                    EventSource::Reconciler,
                    now_millis(),
                );
                self.store
                    .record_transition(&row.id, BackendStatus::Waiting, &transition)
                    .await?;
                return Ok(ContainerUpdate::Unchanged);
            }
            let left = deadline - now_millis();
            if left <= 0 {
                // The planner turns the passed deadline into a hard termination.
                return Ok(ContainerUpdate::Unchanged);
            }
            tokio::time::sleep(delay.min(Duration::from_millis(left as u64))).await;
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    async fn signal(&self, id: &BackendName, container_id: &str, signal: Signal) -> Result<(), Failure> {
        self.docker.kill(container_id, signal).await?;
        self.store.record_signal(id, signal, now_millis()).await?;
        Ok(())
    }

    /// Records `terminated` with the exit, and the container it came from
    /// when known (a container can exit before `waiting` recorded its id).
    async fn record_exit(
        &self,
        row: &BackendRow,
        container_id: Option<String>,
        exit: ObservedExit,
    ) -> Result<(), Failure> {
        crash::point("before_exit_recorded");
        let state = row.state.to_terminated(requested(row), exit.exit_code);
        let mut transition = Transition::new(state, exit.source, exit.finished_at);
        transition.oom_killed = Some(exit.oom_killed);
        transition.container_id = container_id;
        self.store
            .record_transition(&row.id, row.status(), &transition)
            .await?;
        Ok(())
    }

    /// The container vanished: its `die` event's exit if one was seen, else `lost`.
    async fn record_gone(&self, row: &BackendRow, exit: Option<ObservedExit>) -> Result<(), Failure> {
        // A resync can list the world after a removal but before the stream
        // delivered the `die` event: ask Docker's event log once before
        // settling for "lost".
        let exit = match exit {
            Some(exit) => Some(exit),
            None => self.docker.recent_exit(&row.id, RECENT_EXIT_WINDOW).await?,
        };
        if let Some(exit) = exit {
            return self.record_exit(row, None, exit).await;
        }
        let state = match &row.state {
            BackendState::Terminating { .. } | BackendState::HardTerminating { .. } => {
                row.state.to_terminated(None, None)
            }
            _ if row.desired == Desired::Terminated => row.state.to_terminated(requested(row), None),
            _ => BackendState::Terminated {
                last_status: row.status(),
                termination: None,
                reason: Some(TerminationReason::Lost),
                exit_code: None,
            },
        };
        let transition = Transition::new(state, EventSource::Missing, now_millis());
        self.store
            .record_transition(&row.id, row.status(), &transition)
            .await?;
        Ok(())
    }

    async fn record_internal_error(&self, row: &BackendRow, message: &str) -> Result<(), StoreError> {
        if row.status() == BackendStatus::Terminated {
            return Ok(());
        }
        let state = BackendState::Terminated {
            last_status: row.status(),
            termination: None,
            reason: Some(TerminationReason::InternalError),
            exit_code: None,
        };
        let mut transition = Transition::new(state, EventSource::Reconciler, now_millis());
        transition.error = Some(message.to_string());
        self.store
            .record_transition(&row.id, row.status(), &transition)
            .await?;
        Ok(())
    }
}

/// A create or start Docker refused, as the backend's error: the step,
/// Docker's own words, and a hint where the spec asked for something this
/// engine cannot do. An unreachable engine stays a transient failure.
fn container_failure(step: &str, spec: &crate::model::ExecutorSpec, error: DockerError) -> Failure {
    if error.is_unavailable() {
        return error.into();
    }
    let mut message = format!("cannot {step} container: {error}");
    if spec.resource_limits.disk_limit_bytes.is_some() && message.contains("storage-opt") {
        message.push_str(
            " (executable.resource_limits.disk_limit_bytes needs a storage driver that supports a size limit, e.g. overlay2 on xfs mounted with pquota)",
        );
    }
    Failure::Fatal(message)
}

/// The termination a user asked for, when termination is desired.
fn requested(row: &BackendRow) -> Option<(TerminationKind, TerminationReason)> {
    (row.desired == Desired::Terminated).then(|| {
        row.requested_termination
            .unwrap_or((TerminationKind::Soft, TerminationReason::External))
    })
}

fn observed_from(row: &BackendRow, inspected: InspectedContainer) -> ObservedContainer {
    ObservedContainer {
        container_id: inspected.container_id,
        backend: row.id.clone(),
        run_state: inspected.run_state,
        host_port: inspected.host_port,
        exit: inspected.exit,
    }
}

/// One readiness probe: `HEAD /` and a response that starts with `HTTP/`.
/// Docker's port proxy accepts connections before the backend listens, so a
/// connect alone proves nothing.
pub async fn probe_http(target: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(target).await.ok()?;
        stream
            .write_all(b"HEAD / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 5];
        stream.read_exact(&mut head).await.ok()?;
        (&head == b"HTTP/").then_some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(()))
    )
}
