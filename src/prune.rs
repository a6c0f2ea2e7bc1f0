//! Prune: removes this instance's finished containers, and (when enabled)
//! images drover itself pulled that nobody uses any more, journaling every
//! pass in `prune_runs`.
//!
//! It only ever removes what the reconciler is done with: a container goes
//! only when its backend is already `terminated` in the store (so its exit
//! code is recorded and can never be lost to a removal), and only once
//! `min_age` has passed since the container's exit — not since its creation,
//! which would remove a long-lived backend the moment it stops. Finding them
//! costs one list call and one query, whatever the number of containers. An
//! image goes only if the `pulled_images` ledger says drover brought it to the
//! host, no live backend names it, and no backend used it for `min_age`;
//! Docker itself refuses to remove an image a container still uses.
//!
//! It never touches a live backend, never decides anything the planner
//! decides, and acts only on containers carrying this instance's label.

use crate::config::PruneConfig;
use crate::docker::{DockerClient, DockerError};
use crate::model::{now_millis, BackendName, Millis, RunState};
use crate::store::{PruneRunRow, PruneTotals, Store, StoreError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// What a pass removes; the timer's period is separate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneSettings {
    /// Time since a container's exit (an image's last use) before it may go.
    pub min_age: Duration,
    /// Also remove idle images drover pulled.
    pub images: bool,
}

impl PruneSettings {
    pub fn from_config(config: &PruneConfig) -> Self {
        Self {
            min_age: config.min_age,
            images: config.images,
        }
    }
}

/// What started a pass, as recorded in `prune_runs.triggered_by`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Interval,
    Api,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Interval => "interval",
            Trigger::Api => "api",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// The pass could not read or write the store.
    #[error("prune pass failed: {0}")]
    Failed(String),
    #[error("the prune task is not running")]
    Stopped,
}

/// Runs one pass, judging ages at `now`, and returns its `prune_runs` row
/// (`started_at` is `now`). A Docker failure does not fail the pass: it is
/// recorded as the row's `error`, and the pass goes on where it can.
pub async fn run_once(
    store: &Store,
    docker: &DockerClient,
    settings: &PruneSettings,
    trigger: Trigger,
    now: Millis,
) -> Result<PruneRunRow, StoreError> {
    let clock = std::time::Instant::now();
    let run_id = store.begin_prune_run(trigger.as_str(), now).await?;
    let mut pass = Pass::default();
    let min_age = settings.min_age.as_millis() as Millis;
    prune_containers(store, docker, now - min_age, &mut pass).await?;
    if settings.images {
        prune_images(store, docker, now - min_age, &mut pass).await?;
    }
    let totals = PruneTotals {
        containers_removed: pass.containers_removed,
        images_removed: pass.images_removed,
        bytes_reclaimed: pass.bytes_reclaimed,
        error: (!pass.errors.is_empty()).then(|| pass.errors.join("; ")),
    };
    let finished_at = now + clock.elapsed().as_millis() as Millis;
    let row = store.finish_prune_run(run_id, &totals, finished_at).await?;
    if row.containers_removed > 0 || row.images_removed > 0 || row.error.is_some() {
        tracing::info!(
            containers = row.containers_removed,
            images = row.images_removed,
            bytes = row.bytes_reclaimed,
            error = row.error.as_deref().unwrap_or(""),
            "prune pass"
        );
    }
    Ok(row)
}

#[derive(Default)]
struct Pass {
    containers_removed: i64,
    images_removed: i64,
    bytes_reclaimed: i64,
    errors: Vec<String>,
}

/// Removes stopped containers whose backend ended at or before `ended_by`.
async fn prune_containers(
    store: &Store,
    docker: &DockerClient,
    ended_by: Millis,
    pass: &mut Pass,
) -> Result<(), StoreError> {
    let listed = match docker.list_managed().await {
        Ok(listed) => listed,
        Err(e) => {
            pass.errors.push(format!("cannot list containers: {e}"));
            return Ok(());
        }
    };
    // A running container is never a candidate, whatever the store says.
    let stopped: Vec<_> = listed
        .into_iter()
        .filter(|c| c.run_state != RunState::Running)
        .collect();
    let backends: Vec<BackendName> = stopped.iter().map(|c| c.backend.clone()).collect();
    let ends = store.recorded_ends(&backends).await?;
    for container in stopped {
        // Not in `ends`: the backend is live, so its exit is not recorded yet.
        let Some(&ended_at) = ends.get(&container.backend) else {
            continue;
        };
        if ended_at > ended_by {
            continue;
        }
        let size = match docker.container_size(&container.container_id).await {
            Ok(Some(size)) => size,
            Ok(None) => continue,
            Err(e) => {
                pass.errors.push(format!("cannot inspect container {}: {e}", container.container_id));
                continue;
            }
        };
        match docker.remove(&container.container_id, false).await {
            Ok(()) => {
                tracing::debug!(backend = %container.backend, container = %container.container_id, "pruned container");
                pass.containers_removed += 1;
                pass.bytes_reclaimed += size;
            }
            Err(e) => pass.errors.push(format!(
                "cannot remove container {} of {}: {e}",
                container.container_id, container.backend
            )),
        }
    }
    Ok(())
}

/// Removes images drover pulled that no backend used since `unused_since`.
async fn prune_images(
    store: &Store,
    docker: &DockerClient,
    unused_since: Millis,
    pass: &mut Pass,
) -> Result<(), StoreError> {
    for pulled in store.idle_pulled_images(unused_since).await? {
        let info = match docker.image_info(&pulled.image).await {
            Ok(Some(info)) => info,
            Ok(None) => {
                // Someone removed it already: nothing of ours is left.
                store.forget_pulled_image(&pulled.image).await?;
                continue;
            }
            Err(e) => {
                pass.errors.push(format!("cannot inspect image {}: {e}", pulled.image));
                continue;
            }
        };
        if pulled.digest.as_deref().is_some_and(|digest| digest != info.id) {
            // The reference now names an image someone else put there.
            store.forget_pulled_image(&pulled.image).await?;
            continue;
        }
        // Checked again right before the removal: a spawn may have come since
        // the query. (A spawn landing between this check and the removal
        // could still find the image gone; Docker protects any image a
        // container was already created from.)
        if store.image_in_live_use(&pulled.image).await? {
            continue;
        }
        match docker.remove_image(&pulled.image).await {
            Ok(removal) => {
                tracing::debug!(image = %pulled.image, deleted = removal.deleted.len(), "pruned image");
                store.forget_pulled_image(&pulled.image).await?;
                pass.images_removed += 1;
                if removal.deleted.iter().any(|id| *id == info.id) {
                    pass.bytes_reclaimed += info.size;
                }
            }
            // Still used by a container (perhaps not ours): try again next pass.
            Err(DockerError::Conflict(_)) => {}
            Err(DockerError::NotFound(_)) => store.forget_pulled_image(&pulled.image).await?,
            Err(e) => pass.errors.push(format!("cannot remove image {}: {e}", pulled.image)),
        }
    }
    Ok(())
}

/// Notes, for the ledger, that a backend is about to use `image`: when
/// `pulled` (drover just brought it to the host) with its id, else only as a
/// use of an image drover pulled before (nothing when it did not).
pub async fn record_image_use(
    store: &Store,
    docker: &DockerClient,
    image: &str,
    pulled: bool,
    at: Millis,
) -> Result<(), StoreError> {
    if !pulled {
        return store.touch_pulled_image(image, at).await;
    }
    // Without the id the row still marks the image as drover's; prune then
    // skips the "is it still the same image" check.
    let digest = match docker.image_info(image).await {
        Ok(info) => info.map(|i| i.id),
        Err(e) => {
            tracing::warn!(image, error = %e, "cannot read the id of a pulled image");
            None
        }
    };
    store.record_pulled_image(image, digest.as_deref(), at).await
}

/// Asks the prune task for a pass now.
#[derive(Clone, Debug)]
pub struct PruneHandle {
    requests: mpsc::Sender<oneshot::Sender<Result<PruneRunRow, String>>>,
}

impl PruneHandle {
    /// Runs a pass (after the one in progress, if any) and returns its row.
    pub async fn run_now(&self) -> Result<PruneRunRow, PruneError> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(reply).await.map_err(|_| PruneError::Stopped)?;
        answer.await.map_err(|_| PruneError::Stopped)?.map_err(PruneError::Failed)
    }
}

/// Starts the prune task: a pass every `config.interval` (the first one an
/// interval after start) and one for each [`PruneHandle::run_now`], one at a
/// time, until `shutdown` resolves.
pub fn spawn(
    store: Store,
    docker: DockerClient,
    config: &PruneConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (PruneHandle, JoinHandle<()>) {
    let (requests, mut pending) = mpsc::channel::<oneshot::Sender<Result<PruneRunRow, String>>>(16);
    let settings = PruneSettings::from_config(config);
    let period = config.interval.max(Duration::from_millis(10));
    let task = tokio::spawn(async move {
        tokio::pin!(shutdown);
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (trigger, reply) = tokio::select! {
                _ = &mut shutdown => break,
                _ = timer.tick() => (Trigger::Interval, None),
                request = pending.recv() => match request {
                    Some(reply) => (Trigger::Api, Some(reply)),
                    None => break,
                },
            };
            let result = run_once(&store, &docker, &settings, trigger, now_millis()).await;
            if let Err(e) = &result {
                tracing::warn!(error = %e, "prune pass failed");
            }
            if let Some(reply) = reply {
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
        }
    });
    (PruneHandle { requests }, task)
}
