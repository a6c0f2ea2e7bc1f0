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
use crate::store::{Store, StoreError, Transition};
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

impl Executor {
    /// Performs `action` for `row`. Never panics on Docker or store errors:
    /// transient ones come back as a retry, refusals end the backend.
    pub async fn perform(&self, row: BackendRow, action: Action) -> ActionOutcome {
        let backend = row.id.clone();
        let from = row.status();
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
                let _ = from;
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
                self.docker.start(&container_id).await?;
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
                    Some(exit) => (Some(exit), ContainerUpdate::Unchanged),
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
                    Some(exit) => self.record_exit(row, exit).await?,
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
        if must_pull {
            crash::point("before_pull");
            tracing::info!(backend = %row.id, image = %spec.image, "pulling image");
            self.docker
                .pull(&spec.image, spec.credentials.as_ref(), |_| {})
                .await
                .map_err(|e| match e {
                    DockerError::Unavailable { .. } => Failure::from(e),
                    other => Failure::Fatal(format!("pull of {} failed: {other}", spec.image)),
                })?;
            crash::point("after_pull");
        }
        let transition = Transition::new(BackendState::Starting, EventSource::Reconciler, now_millis());
        self.store
            .record_transition(&row.id, state.status(), &transition)
            .await?;
        crash::point("after_starting_recorded");
        Ok(ContainerUpdate::Unchanged)
    }

    async fn create_container(&self, row: &BackendRow) -> Result<ContainerUpdate, Failure> {
        let options = self.container_options(row)?;
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
            Err(e) => return Err(e.into()),
        };
        crash::point("after_create");
        self.docker.start(&container_id).await?;
        crash::point("after_start");
        self.record_waiting(row, &container_id).await
    }

    fn container_options(&self, row: &BackendRow) -> Result<ContainerOptions, Failure> {
        let mount = match &row.spec.mount {
            None | Some(MountSpec::Flag(false)) => None,
            Some(MountSpec::Flag(true)) => {
                return Err(Failure::Fatal(
                    "mount: true needs a key to name the folder".into(),
                ))
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
        Ok(ContainerOptions {
            extra_env: Vec::new(),
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

    async fn record_exit(&self, row: &BackendRow, exit: ObservedExit) -> Result<(), Failure> {
        crash::point("before_exit_recorded");
        let state = row.state.to_terminated(requested(row), exit.exit_code);
        let mut transition = Transition::new(state, exit.source, exit.finished_at);
        transition.oom_killed = Some(exit.oom_killed);
        self.store
            .record_transition(&row.id, row.status(), &transition)
            .await?;
        Ok(())
    }

    /// The container vanished: its `die` event's exit if one was seen, else `lost`.
    async fn record_gone(&self, row: &BackendRow, exit: Option<ObservedExit>) -> Result<(), Failure> {
        if let Some(exit) = exit {
            return self.record_exit(row, exit).await;
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
