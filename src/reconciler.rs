//! The reconcile loop: observe → plan → apply, woken by one closed set of
//! [`Wake`]s.
//!
//! It keeps the picture of Docker ([`Observed`]) current from one list call
//! per resync and from the event stream, asks the pure planner what to do, and
//! hands each action to the executor as a task. At most one task per backend
//! runs at a time; only a readiness probe (which writes nothing until it
//! succeeds) is ever cancelled. Boot is simply the first pass, after replaying
//! the Docker events missed while the daemon was down.

use crate::docker::{docker_timestamp, ContainerAction, ContainerEvent, DockerClient};
use crate::executor::{ActionOutcome, ContainerUpdate, Executor};
use crate::model::{
    now_millis, BackendName, BackendRow, BackendStatus, EventSource, Millis, ObservedExit, RunState,
};
use crate::planner::{self, Action, Observed};
use crate::store::{Store, StoreError};
use futures::{FutureExt, StreamExt};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Meta key of the Docker event watermark: events after it may not have been
/// acted on yet, so the next boot replays from there.
const EVENTS_SINCE_KEY: &str = "docker_events_since_nanos";

/// Why the loop woke, besides desired-state changes (a `Notify` from the
/// store), the resync tick and deadlines, which the loop's `select!` waits on
/// directly. Every wake leads to the same pass.
#[derive(Debug)]
pub enum Wake {
    Docker(ContainerEvent),
    /// The event stream was re-opened after a break (the events missed
    /// meanwhile already replayed): resync everything.
    StreamReconnected,
    /// The event stream broke and the engine does not answer a ping: an
    /// outage begins.
    StreamLost(String),
    /// A task finished; the number tells which dispatch it was, so the
    /// outcome of a cancelled probe that finished anyway is recognised.
    TaskDone(u64, ActionOutcome),
}

/// Shared, lock-free view of the loop's health, for `/healthz` and `/metrics`.
#[derive(Debug, Default)]
pub struct ReconcilerStatus {
    pub docker_up: AtomicBool,
    pub passes: AtomicU64,
    pub pass_micros_total: AtomicU64,
    pub stream_reconnects: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct ReconcilerSettings {
    pub resync_interval: Duration,
}

struct InFlight {
    /// Which dispatch this is (see [`Wake::TaskDone`]).
    task: u64,
    action: Action,
    abort: AbortHandle,
}

pub struct Reconciler {
    store: Store,
    docker: DockerClient,
    executor: Executor,
    settings: ReconcilerSettings,
    status: Arc<ReconcilerStatus>,
    observed: Observed,
    /// OOM events seen, by container, waiting for their `die`.
    oom_seen: HashSet<String>,
    in_flight: HashMap<BackendName, InFlight>,
    retry_at: HashMap<BackendName, Instant>,
    /// Every live backend's row, as committed: read whole at boot, then kept
    /// current by re-reading only the rows the store notes as changed, so a
    /// pass costs no SQLite read per live backend.
    rows: HashMap<BackendName, BackendRow>,
    /// Read every live row on the next pass (at boot, or after a failed read).
    reload_rows: bool,
    /// Rows to read again on the next pass whether or not the store noted a
    /// write: those of finished or cancelled tasks, whose writes may not have
    /// been noted (a cancelled future) or were refused as stale.
    reread: HashSet<BackendName>,
    /// Number of the next dispatched task.
    next_task: u64,
    wake_tx: mpsc::UnboundedSender<Wake>,
    wake_rx: mpsc::UnboundedReceiver<Wake>,
    /// Time of the latest Docker event seen, to resume the stream.
    last_event_nanos: Arc<AtomicU64>,
    /// Whether `docker_outages` may hold an open row to close on the next
    /// successful Docker call: after an outage began, after closing one
    /// failed, and at boot (a previous run may have stopped mid-outage).
    outage_may_be_open: bool,
}

impl Reconciler {
    pub fn new(executor: Executor, settings: ReconcilerSettings) -> Self {
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        Self {
            store: executor.store.clone(),
            docker: executor.docker.clone(),
            executor,
            settings,
            status: Arc::new(ReconcilerStatus::default()),
            observed: Observed::default(),
            oom_seen: HashSet::new(),
            in_flight: HashMap::new(),
            retry_at: HashMap::new(),
            rows: HashMap::new(),
            reload_rows: true,
            reread: HashSet::new(),
            next_task: 0,
            wake_tx,
            wake_rx,
            last_event_nanos: Arc::new(AtomicU64::new(0)),
            outage_may_be_open: true,
        }
    }

    pub fn status(&self) -> Arc<ReconcilerStatus> {
        self.status.clone()
    }

    /// Runs until `shutdown` resolves. Containers are left as they are.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let boot_nanos = now_nanos();
        self.replay_missed_events(boot_nanos).await;
        self.resync().await;
        self.spawn_event_watcher(boot_nanos);
        let desired_changed = self.store.desired_changed();
        let mut resync = tokio::time::interval_at(
            Instant::now() + self.settings.resync_interval,
            self.settings.resync_interval,
        );
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut full_resync = false;
        loop {
            let pass_started = std::time::Instant::now();
            let (wrote_exit, deadline) = self.pass().await;
            self.status.passes.fetch_add(1, Ordering::Relaxed);
            self.status
                .pass_micros_total
                .fetch_add(pass_started.elapsed().as_micros() as u64, Ordering::Relaxed);
            if full_resync && !wrote_exit && self.status.docker_up.load(Ordering::Relaxed) {
                self.save_watermark().await;
            }
            full_resync = false;

            tokio::select! {
                _ = &mut shutdown => break,
                _ = desired_changed.notified() => {}
                _ = resync.tick() => {
                    self.resync().await;
                    full_resync = true;
                }
                _ = sleep_until_opt(deadline) => {}
                wake = self.wake_rx.recv() => {
                    if let Some(wake) = wake {
                        full_resync |= self.handle(wake).await;
                    }
                }
            }
            // Take every wake already queued, so a burst costs one pass.
            while let Ok(wake) = self.wake_rx.try_recv() {
                full_resync |= self.handle(wake).await;
            }
        }
        self.shutdown().await;
    }

    /// Applies a wake to the picture; true when it asked for a full resync.
    async fn handle(&mut self, wake: Wake) -> bool {
        match wake {
            Wake::Docker(event) => {
                self.apply_event(event);
                false
            }
            Wake::StreamLost(message) => {
                self.mark_docker_down("event-stream", &message).await;
                false
            }
            Wake::StreamReconnected => {
                self.status.stream_reconnects.fetch_add(1, Ordering::Relaxed);
                self.resync().await;
                true
            }
            Wake::TaskDone(task, outcome) => {
                self.apply_outcome(task, outcome).await;
                false
            }
        }
    }

    /// Lets mutating tasks finish (bounded), cancels probes, leaves containers alone.
    async fn shutdown(&mut self) {
        for in_flight in self.in_flight.values() {
            if matches!(in_flight.action, Action::Probe { .. }) {
                in_flight.abort.abort();
            }
        }
        self.in_flight
            .retain(|_, f| !matches!(f.action, Action::Probe { .. }));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, self.wake_rx.recv()).await {
                Ok(Some(Wake::TaskDone(task, outcome))) => {
                    if self.in_flight.get(&outcome.backend).is_some_and(|f| f.task == task) {
                        self.in_flight.remove(&outcome.backend);
                    }
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        tracing::info!("reconciler stopped; containers left running");
    }

    /// One pass: plan every live backend and start the actions. Returns
    /// whether an exit is about to be recorded (so the watermark must wait),
    /// and when the next pass is due if nothing wakes the loop before.
    async fn pass(&mut self) -> (bool, Option<Instant>) {
        if let Err(e) = self.refresh_rows().await {
            tracing::warn!(error = %e, "cannot read backends; retrying");
            return (true, Some(Instant::now() + Duration::from_millis(500)));
        }
        let now = now_millis();
        let instant_now = Instant::now();
        self.retry_at.retain(|_, at| *at > instant_now);
        let rows = &self.rows;
        self.observed
            .remembered_exits
            .retain(|id, _| rows.contains_key(id));
        let mut exit_pending = false;
        let mut actions = Vec::new();
        for row in self.rows.values() {
            let container = self.observed.containers.get(&row.id);
            let remembered = self.observed.remembered_exits.get(&row.id).copied();
            let Some(action) = planner::plan_backend(row, container, remembered, now) else {
                continue;
            };
            if matches!(action, Action::RecordExit { .. } | Action::RecordGone { .. }) {
                exit_pending = true;
            }
            if let Some(in_flight) = self.in_flight.get(&row.id) {
                let replace = matches!(in_flight.action, Action::Probe { .. })
                    && !matches!(action, Action::Probe { .. });
                if !replace {
                    continue;
                }
                in_flight.abort.abort();
                self.in_flight.remove(&row.id);
                // A probe cancelled mid-commit may have written `ready`
                // without the store noting it: read the row again.
                self.reread.insert(row.id.clone());
            }
            if self.retry_at.contains_key(&row.id) {
                continue;
            }
            actions.push((row.clone(), action));
        }
        for (row, action) in actions {
            self.dispatch(row, action);
        }
        (exit_pending, self.next_wake(now))
    }

    /// Brings `rows` up to date: every live row at boot (or after a failed
    /// read), otherwise only the rows written since the last pass. The set of
    /// written rows is taken before reading, so a write committed meanwhile
    /// is read again on the next pass.
    async fn refresh_rows(&mut self) -> Result<(), StoreError> {
        let changed = self.store.take_changed();
        let reread = std::mem::take(&mut self.reread);
        let ids = match changed {
            Some(ids) if !self.reload_rows => ids.into_iter().chain(reread).collect::<HashSet<_>>(),
            _ => {
                self.reload_rows = true;
                let rows = self.store.live_backends().await?;
                self.rows = rows.into_iter().map(|row| (row.id.clone(), row)).collect();
                self.reload_rows = false;
                return Ok(());
            }
        };
        for id in ids {
            match self.store.get_backend(&id).await {
                Ok(Some(row)) if row.status() != BackendStatus::Terminated => {
                    self.rows.insert(id, row);
                }
                Ok(_) => {
                    self.rows.remove(&id);
                }
                Err(e) => {
                    // The rest of the taken set would be lost: read everything next time.
                    self.reload_rows = true;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn dispatch(&mut self, row: BackendRow, action: Action) {
        tracing::debug!(backend = %row.id, ?action, "dispatch");
        let executor = self.executor.clone();
        let wake_tx = self.wake_tx.clone();
        let id = row.id.clone();
        let task_action = action.clone();
        let task = self.next_task;
        self.next_task += 1;
        let handle = tokio::spawn(async move {
            let backend = row.id.clone();
            // A panicking action must not leave its backend marked busy forever.
            let outcome = match std::panic::AssertUnwindSafe(executor.perform(row, task_action))
                .catch_unwind()
                .await
            {
                Ok(outcome) => outcome,
                Err(_) => {
                    tracing::error!(backend = %backend, "action panicked; will retry");
                    ActionOutcome {
                        backend,
                        container: ContainerUpdate::Unchanged,
                        retry_after: Some(Duration::from_secs(1)),
                        docker_unavailable: false,
                    }
                }
            };
            let _ = wake_tx.send(Wake::TaskDone(task, outcome));
        });
        self.in_flight.insert(
            id,
            InFlight {
                task,
                action,
                abort: handle.abort_handle(),
            },
        );
    }

    async fn apply_outcome(&mut self, task: u64, outcome: ActionOutcome) {
        // The row may have moved on in ways the store's change notes miss
        // (a refused compare-and-set): read it again before planning it.
        self.reread.insert(outcome.backend.clone());
        if self.in_flight.get(&outcome.backend).is_some_and(|f| f.task == task) {
            self.in_flight.remove(&outcome.backend);
        }
        match outcome.container {
            ContainerUpdate::Unchanged => {}
            ContainerUpdate::Observed(container) => {
                self.observed
                    .containers
                    .insert(outcome.backend.clone(), container);
            }
            ContainerUpdate::Gone => {
                self.observed.containers.remove(&outcome.backend);
            }
        }
        if let Some(after) = outcome.retry_after {
            self.retry_at
                .insert(outcome.backend.clone(), Instant::now() + after);
        }
        if outcome.docker_unavailable {
            self.mark_docker_down("action", "a docker call failed").await;
        }
    }

    /// Folds one Docker event into the picture.
    fn apply_event(&mut self, event: ContainerEvent) {
        self.last_event_nanos
            .fetch_max(event.time_nano.max(0) as u64, Ordering::Relaxed);
        tracing::debug!(backend = %event.backend, action = ?event.action, "docker event");
        let entry = self.observed.containers.get_mut(&event.backend);
        match event.action {
            ContainerAction::Create => {
                if entry.is_none() {
                    self.observed.containers.insert(
                        event.backend.clone(),
                        crate::model::ObservedContainer {
                            container_id: event.container_id,
                            backend: event.backend,
                            run_state: RunState::Created,
                            host_port: None,
                            exit: None,
                        },
                    );
                }
            }
            ContainerAction::Start => {
                if let Some(container) = entry {
                    container.run_state = RunState::Running;
                    container.exit = None;
                }
            }
            ContainerAction::Oom => {
                self.oom_seen.insert(event.container_id);
            }
            ContainerAction::Die { exit_code } => {
                let exit = ObservedExit {
                    exit_code,
                    finished_at: event.time_ms,
                    oom_killed: self.oom_seen.remove(&event.container_id),
                    source: EventSource::DockerEvent,
                };
                self.observed
                    .remembered_exits
                    .insert(event.backend.clone(), exit);
                match entry {
                    Some(container) if container.container_id == event.container_id => {
                        container.run_state = RunState::Exited;
                        container.exit = Some(exit);
                    }
                    Some(_) => {}
                    None => {
                        self.observed.containers.insert(
                            event.backend.clone(),
                            crate::model::ObservedContainer {
                                container_id: event.container_id,
                                backend: event.backend,
                                run_state: RunState::Exited,
                                host_port: None,
                                exit: Some(exit),
                            },
                        );
                    }
                }
            }
            ContainerAction::Destroy => {
                if entry.is_some_and(|c| c.container_id == event.container_id) {
                    self.observed.containers.remove(&event.backend);
                }
            }
        }
    }

    /// Replaces the picture with one list call, keeping exit details already
    /// learned from events for containers that are still there.
    async fn resync(&mut self) {
        match self.docker.list_managed().await {
            Ok(listed) => {
                let mut containers = HashMap::with_capacity(listed.len());
                for mut container in listed {
                    if let Some(known) = self.observed.containers.get(&container.backend) {
                        if known.container_id == container.container_id
                            && container.run_state == RunState::Exited
                        {
                            container.exit = known.exit;
                        }
                        if container.host_port.is_none() {
                            container.host_port = known.host_port;
                        }
                    }
                    containers.insert(container.backend.clone(), container);
                }
                self.observed.containers = containers;
                self.mark_docker_up().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "resync: cannot list containers");
                self.mark_docker_down("resync", &e.to_string()).await;
            }
        }
    }

    /// Reads the events Docker kept from the last watermark up to boot: the
    /// exit codes of containers that died, even removed, while we were down.
    async fn replay_missed_events(&mut self, until_nanos: u64) {
        let since = match self.store.get_meta(EVENTS_SINCE_KEY).await {
            Ok(Some(since)) => since,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read event watermark");
                return;
            }
        };
        let Ok(since_nanos) = since.parse::<i64>() else {
            return;
        };
        let mut stream = Box::pin(self.docker.events(
            Some(docker_timestamp(since_nanos)),
            Some(docker_timestamp(until_nanos as i64)),
        ));
        let mut replayed = 0usize;
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
                Ok(Some(Ok(event))) => {
                    replayed += 1;
                    self.apply_event(event);
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "event replay failed");
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!("event replay timed out");
                    break;
                }
            }
        }
        tracing::info!(replayed, "replayed docker events missed while down");
    }

    async fn save_watermark(&mut self) {
        // Everything seen up to the start of this resync has been acted on;
        // a second of slack covers clock granularity.
        let nanos = now_nanos() as i64 - 1_000_000_000 - self.settings.resync_interval.as_nanos() as i64;
        if let Err(e) = self.store.set_meta(EVENTS_SINCE_KEY, &nanos.to_string()).await {
            tracing::warn!(error = %e, "cannot save event watermark");
        }
    }

    /// Docker did not answer: `/healthz` turns 503 and the outage is
    /// journaled (once: an open outage is not opened again).
    async fn mark_docker_down(&mut self, noticed_by: &str, detail: &str) {
        if self.status.docker_up.swap(false, Ordering::Relaxed) {
            tracing::warn!(noticed_by, detail, "docker engine unreachable");
        }
        self.outage_may_be_open = true;
        if let Err(e) = self
            .store
            .open_docker_outage(noticed_by, detail, now_millis())
            .await
        {
            tracing::warn!(error = %e, "cannot journal docker outage");
        }
    }

    /// Docker answered: closes the open outage, if any. Tried again on the
    /// next answer while closing fails, and done on the first answer after
    /// boot too, so an outage left open by a run that stopped during it is
    /// ended rather than left open for ever (which would also keep every
    /// later outage out of the journal).
    async fn mark_docker_up(&mut self) {
        let was_up = self.status.docker_up.swap(true, Ordering::Relaxed);
        if was_up && !self.outage_may_be_open {
            return;
        }
        match self.store.close_docker_outage(now_millis()).await {
            Ok(closed) => {
                self.outage_may_be_open = false;
                if closed {
                    tracing::info!("docker engine reachable again");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot close docker outage"),
        }
    }

    /// The earliest deadline among live backends (not busy) or retries.
    fn next_wake(&self, now_ms: Millis) -> Option<Instant> {
        let now = Instant::now();
        let deadline = self
            .rows
            .values()
            .filter(|r| !self.in_flight.contains_key(&r.id))
            .filter_map(planner::next_deadline)
            .min()
            .map(|at: Millis| now + Duration::from_millis((at - now_ms).max(0) as u64));
        let retry = self.retry_at.values().min().copied();
        match (deadline, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Follows Docker's event stream from `since_nanos`. When the stream
    /// breaks, asks the engine for a ping: only an engine that does not
    /// answer is an outage ([`Wake::StreamLost`], then pings with backoff
    /// until it answers). Once it answers, the events Docker kept since the
    /// last one seen are replayed first (a container removed meanwhile keeps
    /// the exit code of its `die`), then [`Wake::StreamReconnected`] asks for
    /// the full resync, and the stream is followed again: the same order as
    /// at boot.
    fn spawn_event_watcher(&self, since_nanos: u64) {
        let docker = self.docker.clone();
        let wake_tx = self.wake_tx.clone();
        let last = self.last_event_nanos.clone();
        last.fetch_max(since_nanos, Ordering::Relaxed);
        tokio::spawn(async move {
            // Re-opening a stream that keeps breaking at once waits ever longer.
            let mut pause = Duration::ZERO;
            loop {
                let opened = Instant::now();
                let since = last.load(Ordering::Relaxed) as i64;
                let mut stream = Box::pin(docker.events(Some(docker_timestamp(since)), None));
                let mut reason = loop {
                    match stream.next().await {
                        Some(Ok(event)) => {
                            last.fetch_max(event.time_nano.max(0) as u64, Ordering::Relaxed);
                            if wake_tx.send(Wake::Docker(event)).is_err() {
                                return;
                            }
                        }
                        Some(Err(e)) => break e.to_string(),
                        None => break "event stream ended".to_string(),
                    }
                };
                drop(stream);
                pause = if opened.elapsed() < STREAM_STABLE_AFTER {
                    (pause * 2).clamp(STREAM_BACKOFF_MIN, STREAM_BACKOFF_MAX)
                } else {
                    Duration::ZERO
                };
                let mut wait = pause;
                let mut outage_reported = false;
                loop {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).clamp(STREAM_BACKOFF_MIN, STREAM_BACKOFF_MAX);
                    let answers = matches!(
                        tokio::time::timeout(PING_TIMEOUT, docker.ping()).await,
                        Ok(Ok(()))
                    );
                    if !answers {
                        if !outage_reported {
                            if wake_tx.send(Wake::StreamLost(reason.clone())).is_err() {
                                return;
                            }
                            outage_reported = true;
                        }
                        continue;
                    }
                    match replay_since_last(&docker, &wake_tx, &last).await {
                        Ok(true) => break,
                        Ok(false) => return,
                        Err(e) => reason = e,
                    }
                }
                if wake_tx.send(Wake::StreamReconnected).is_err() {
                    return;
                }
            }
        });
    }
}

/// How long a re-opened event stream must last to count as working again.
const STREAM_STABLE_AFTER: Duration = Duration::from_secs(1);
const STREAM_BACKOFF_MIN: Duration = Duration::from_millis(100);
const STREAM_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A ping slower than this counts as no answer.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the next replayed event (the engine sends kept events at once).
const REPLAY_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends the loop the events Docker kept from the last one seen up to now.
/// `Ok(false)` when the loop is gone; `Err` when the engine failed meanwhile.
async fn replay_since_last(
    docker: &DockerClient,
    wake_tx: &mpsc::UnboundedSender<Wake>,
    last: &AtomicU64,
) -> Result<bool, String> {
    let since = last.load(Ordering::Relaxed) as i64;
    let until = now_nanos() as i64;
    let mut replay = Box::pin(docker.events(
        Some(docker_timestamp(since)),
        Some(docker_timestamp(until)),
    ));
    let mut replayed = 0usize;
    loop {
        match tokio::time::timeout(REPLAY_TIMEOUT, replay.next()).await {
            Ok(Some(Ok(event))) => {
                replayed += 1;
                last.fetch_max(event.time_nano.max(0) as u64, Ordering::Relaxed);
                if wake_tx.send(Wake::Docker(event)).is_err() {
                    return Ok(false);
                }
            }
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => {
                tracing::info!(replayed, "docker event stream re-opened");
                return Ok(true);
            }
            Err(_) => {
                // An engine whose clock is behind ours holds the replay open
                // until `until`; the live stream, opened from the last event
                // seen, delivers the rest.
                tracing::warn!(replayed, "event replay timed out; following the live stream");
                return Ok(true);
            }
        }
    }
}

fn now_nanos() -> u64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0).max(0) as u64
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
