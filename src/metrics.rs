//! The resource sampler: every `metrics.interval`, one reading of each running
//! backend's container, appended to `metrics_samples` and published to
//! subscribers; old samples are deleted in batches on the same tick.
//!
//! Its cost is bounded by design: one one-shot stats call per running backend
//! per tick (no stream held open per container), at most
//! [`MAX_CONCURRENT_STATS`] at a time, and no list call (the running backends
//! and their containers come from the store). It only reads Docker and only
//! writes its own table; it decides nothing about a backend's life.
//! Subscribers (the `/metrics` page, the runtime facade's callbacks through
//! [`forward`]) are fed from the rows it appended, never from Docker directly.

use crate::config::MetricsConfig;
use crate::docker::{ContainerStats, DockerClient, DockerError};
use crate::model::{now_millis, BackendName, Millis};
use crate::runtime::{BackendMetricsMessage, MetricsSubscribers};
use crate::store::Store;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Stats calls in flight at once, whatever the number of backends.
///
/// A one-shot call costs Docker one collection of that container, but it
/// waits for the engine's stats collector, which runs once a second for every
/// container asked about at that moment: each call takes up to a second of
/// wall time, almost none of it work. The bound is therefore set for latency,
/// not load: 32 containers are read per collector cycle, so a tick over N
/// running backends takes about N / 32 seconds (4 at a time made it N / 4).
pub const MAX_CONCURRENT_STATS: usize = 32;
/// A stats call that takes longer is counted as an error, so one stuck call
/// cannot stall the tick.
const STATS_TIMEOUT: Duration = Duration::from_secs(10);
/// Rows deleted by one retention statement.
pub const RETENTION_BATCH: u32 = 1000;
/// Retention statements per tick at most, so a large backlog (say, after
/// shortening the retention) is worked off over a few ticks, not in one burst.
const RETENTION_BATCHES_PER_TICK: u32 = 50;
/// Samples a slow subscriber may fall behind by before it misses some.
const FEED_CAPACITY: usize = 1024;
/// The shortest interval honoured: a zero interval would spin.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// One reading of one backend, as stored in `metrics_samples`: the fields of
/// Plane's `BackendMetricsMessage`, with a timestamp and the raw CPU counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsSample {
    pub backend_id: BackendName,
    pub timestamp_ms: Millis,
    pub mem_total: u64,
    pub mem_used: u64,
    pub mem_active: u64,
    pub mem_inactive: u64,
    pub mem_unevictable: u64,
    pub mem_limit: u64,
    /// Container CPU time (ns) since the backend's previous sample; `None` on
    /// its first one, which has nothing to compare with.
    pub cpu_used: Option<u64>,
    /// Host CPU time (ns) over the same span as `cpu_used`.
    pub sys_cpu: Option<u64>,
    /// The container's cumulative CPU time (ns) since it started.
    pub cpu_total_ns: u64,
    /// The host's cumulative CPU time (ns) since boot.
    pub sys_cpu_total_ns: u64,
}

/// The cumulative counters of a backend's last sample: what the next one's
/// CPU deltas are measured from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuBaseline {
    pub cpu_total_ns: u64,
    pub sys_cpu_total_ns: u64,
}

impl MetricsSample {
    /// The sample for a reading, with CPU deltas against `baseline`. A counter
    /// that went backwards (a restarted container) gives no delta.
    pub fn from_reading(
        backend_id: BackendName,
        timestamp_ms: Millis,
        reading: &ContainerStats,
        baseline: Option<CpuBaseline>,
    ) -> Self {
        let deltas = baseline.and_then(|base| {
            Some((
                reading.cpu_total_ns.checked_sub(base.cpu_total_ns)?,
                reading.system_cpu_ns.checked_sub(base.sys_cpu_total_ns)?,
            ))
        });
        Self {
            backend_id,
            timestamp_ms,
            mem_total: reading.mem_total,
            mem_used: reading.mem_used,
            mem_active: reading.mem_active,
            mem_inactive: reading.mem_inactive,
            mem_unevictable: reading.mem_unevictable,
            mem_limit: reading.mem_limit,
            cpu_used: deltas.map(|d| d.0),
            sys_cpu: deltas.map(|d| d.1),
            cpu_total_ns: reading.cpu_total_ns,
            sys_cpu_total_ns: reading.system_cpu_ns,
        }
    }

    /// The sample as Plane's message; `None` without CPU deltas.
    pub fn plane_message(&self) -> Option<BackendMetricsMessage> {
        Some(BackendMetricsMessage {
            backend_id: self.backend_id.clone(),
            mem_total: self.mem_total,
            mem_used: self.mem_used,
            mem_active: self.mem_active,
            mem_inactive: self.mem_inactive,
            mem_unevictable: self.mem_unevictable,
            mem_limit: self.mem_limit,
            cpu_used: self.cpu_used?,
            sys_cpu: self.sys_cpu?,
        })
    }

    pub fn baseline(&self) -> CpuBaseline {
        CpuBaseline {
            cpu_total_ns: self.cpu_total_ns,
            sys_cpu_total_ns: self.sys_cpu_total_ns,
        }
    }
}

/// Hands every sample to the runtime facade's `metrics_callback` receivers
/// as Plane's `BackendMetricsMessage`, until `shutdown`. A backend's first
/// sample has no CPU deltas and is not handed on (Plane skips it too). Runs
/// on its own task, so a slow callback delays only the callbacks, never the
/// sampler or the table.
pub async fn forward(
    feed: MetricsFeed,
    subscribers: MetricsSubscribers,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut samples = feed.subscribe();
    loop {
        let sample = tokio::select! {
            _ = &mut shutdown => return,
            sample = samples.recv() => sample,
        };
        match sample {
            Ok(sample) => {
                if let Some(message) = sample.plane_message() {
                    subscribers.publish(message);
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "metrics callbacks too slow; samples skipped (still stored)"
                );
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Counters of the sampler's work, for `/metrics`.
#[derive(Debug, Default)]
pub struct SamplerStatus {
    pub ticks: AtomicU64,
    pub samples: AtomicU64,
    /// Stats calls that failed (Docker unreachable or refusing).
    pub errors: AtomicU64,
    pub deleted: AtomicU64,
    /// Wall time spent in ticks, in microseconds.
    pub tick_micros_total: AtomicU64,
}

/// A handle on the sampler's output: subscribe to new samples, read its counters.
#[derive(Clone, Debug)]
pub struct MetricsFeed {
    sender: broadcast::Sender<MetricsSample>,
    status: Arc<SamplerStatus>,
}

impl MetricsFeed {
    /// Every sample appended from now on, in the order they were stored. A
    /// receiver that falls more than [`FEED_CAPACITY`] samples behind gets
    /// `RecvError::Lagged` and continues with the newest; the table keeps them all.
    pub fn subscribe(&self) -> broadcast::Receiver<MetricsSample> {
        self.sender.subscribe()
    }

    pub fn status(&self) -> &Arc<SamplerStatus> {
        &self.status
    }
}

impl Default for MetricsFeed {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(FEED_CAPACITY).0,
            status: Arc::default(),
        }
    }
}

/// What one tick did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Containers asked for stats (one Docker call each).
    pub stats_calls: usize,
    pub samples: usize,
    pub errors: usize,
    pub deleted: u64,
}

pub struct Sampler {
    store: Store,
    docker: DockerClient,
    interval: Duration,
    retention: Duration,
    feed: MetricsFeed,
    /// Last counters per backend, by container; forgotten when a backend stops
    /// running. Plain map: only the sampler's own task touches it.
    baselines: HashMap<BackendName, (String, CpuBaseline)>,
}

impl Sampler {
    pub fn new(store: Store, docker: DockerClient, config: &MetricsConfig) -> Self {
        if config.interval < MIN_INTERVAL {
            tracing::warn!(interval = ?config.interval, min = ?MIN_INTERVAL, "metrics.interval too short; using the minimum");
        }
        Self {
            store,
            docker,
            interval: config.interval.max(MIN_INTERVAL),
            retention: config.retention,
            feed: MetricsFeed::default(),
            baselines: HashMap::new(),
        }
    }

    pub fn feed(&self) -> MetricsFeed {
        self.feed.clone()
    }

    /// Samples every interval until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = ticks.tick() => {
                    let report = self.tick().await;
                    tracing::trace!(?report, "metrics tick");
                }
            }
        }
    }

    /// One tick: sample every running backend, store and publish, then
    /// delete what is past retention.
    pub async fn tick(&mut self) -> TickReport {
        let started = std::time::Instant::now();
        let mut report = TickReport::default();
        let status = self.feed.status.clone();
        match self.store.sampling_targets().await {
            Ok(targets) => self.sample(targets, &mut report).await,
            Err(e) => tracing::warn!(error = %e, "metrics: cannot read running backends"),
        }
        let cutoff = now_millis() - self.retention.as_millis().min(i64::MAX as u128) as i64;
        for _ in 0..RETENTION_BATCHES_PER_TICK {
            match self
                .store
                .delete_samples_before(cutoff, RETENTION_BATCH)
                .await
            {
                Ok(deleted) => {
                    report.deleted += deleted;
                    if deleted < u64::from(RETENTION_BATCH) {
                        break;
                    }
                    // Let other writers in between two batches.
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: cannot delete old samples");
                    break;
                }
            }
        }
        status.deleted.fetch_add(report.deleted, Ordering::Relaxed);
        status
            .tick_micros_total
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        status.ticks.fetch_add(1, Ordering::Relaxed);
        report
    }

    async fn sample(&mut self, targets: Vec<(BackendName, String)>, report: &mut TickReport) {
        self.baselines
            .retain(|id, _| targets.iter().any(|(target, _)| target == id));
        report.stats_calls = targets.len();
        let docker = self.docker.clone();
        let readings: Vec<Reading> = futures::stream::iter(targets)
            .map(|(backend, container)| {
                let docker = docker.clone();
                async move {
                    let result = read_stats(&docker, &container).await;
                    Reading {
                        backend,
                        container,
                        result,
                        at: now_millis(),
                    }
                }
            })
            .buffer_unordered(MAX_CONCURRENT_STATS)
            .collect()
            .await;
        let mut samples = Vec::with_capacity(readings.len());
        for Reading {
            backend: id,
            container,
            result,
            at,
        } in readings
        {
            let reading = match result {
                Ok(Some(reading)) => reading,
                // Not running (yet, or any more) or already removed.
                Ok(None) => continue,
                Err(e) => {
                    report.errors += 1;
                    tracing::debug!(backend = %id, error = %e, "metrics: stats call failed");
                    continue;
                }
            };
            let baseline = match self.baselines.get(&id) {
                Some((known, baseline)) if *known == container => Some(*baseline),
                Some(_) => None,
                // First sight in this process: continue from the stored sample, if any.
                None => self.store.latest_cpu_baseline(&id).await.unwrap_or_else(|e| {
                    tracing::debug!(backend = %id, error = %e, "metrics: cannot read last sample");
                    None
                }),
            };
            let sample = MetricsSample::from_reading(id.clone(), at, &reading, baseline);
            self.baselines.insert(id, (container, sample.baseline()));
            samples.push(sample);
        }
        samples
            .sort_by(|a, b| (a.timestamp_ms, &a.backend_id).cmp(&(b.timestamp_ms, &b.backend_id)));
        let status = &self.feed.status;
        status
            .errors
            .fetch_add(report.errors as u64, Ordering::Relaxed);
        if samples.is_empty() {
            return;
        }
        if let Err(e) = self.store.insert_samples(&samples).await {
            tracing::warn!(error = %e, count = samples.len(), "metrics: cannot store samples");
            return;
        }
        report.samples = samples.len();
        status
            .samples
            .fetch_add(samples.len() as u64, Ordering::Relaxed);
        for sample in samples {
            // No subscriber is not an error: the rows are stored.
            let _ = self.feed.sender.send(sample);
        }
    }
}

/// One stats answer of a tick, stamped when it arrived.
struct Reading {
    backend: BackendName,
    container: String,
    result: Result<Option<ContainerStats>, DockerError>,
    at: Millis,
}

/// One stats call, bounded by [`STATS_TIMEOUT`].
async fn read_stats(
    docker: &DockerClient,
    container: &str,
) -> Result<Option<ContainerStats>, DockerError> {
    match tokio::time::timeout(STATS_TIMEOUT, docker.stats(container)).await {
        Ok(result) => result,
        Err(_) => Err(DockerError::Unavailable {
            endpoint: docker.endpoint().to_string(),
            message: format!("stats call timed out after {STATS_TIMEOUT:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(cpu: u64, sys: u64) -> ContainerStats {
        ContainerStats {
            mem_total: 10,
            mem_used: 8,
            mem_active: 4,
            mem_inactive: 3,
            mem_unevictable: 1,
            mem_limit: 100,
            cpu_total_ns: cpu,
            system_cpu_ns: sys,
        }
    }

    #[test]
    fn first_sample_has_no_cpu_deltas_and_later_ones_do() {
        let id = BackendName::parse("ba-cpu").unwrap();
        let first = MetricsSample::from_reading(id.clone(), 1, &reading(500, 10_000), None);
        assert_eq!((first.cpu_used, first.sys_cpu), (None, None));
        assert_eq!((first.mem_used, first.mem_limit), (8, 100));
        let second = MetricsSample::from_reading(
            id.clone(),
            2,
            &reading(800, 14_000),
            Some(first.baseline()),
        );
        assert_eq!((second.cpu_used, second.sys_cpu), (Some(300), Some(4_000)));
        assert_eq!(
            (second.cpu_total_ns, second.sys_cpu_total_ns),
            (800, 14_000)
        );
    }

    #[tokio::test]
    async fn callbacks_get_samples_with_cpu_deltas_as_plane_messages() {
        let feed = MetricsFeed::default();
        let subscribers = MetricsSubscribers::default();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        subscribers.subscribe(Box::new(move |message: BackendMetricsMessage| {
            let _ = seen_tx.send(message);
        }));
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let forwarder = tokio::spawn(forward(feed.clone(), subscribers, async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        }));
        // Let the forwarder subscribe before anything is sent.
        while feed.sender.receiver_count() == 0 {
            tokio::task::yield_now().await;
        }
        let id = BackendName::parse("ba-fwd").unwrap();
        let first = MetricsSample::from_reading(id.clone(), 1, &reading(500, 10_000), None);
        let second = MetricsSample::from_reading(
            id.clone(),
            2,
            &reading(800, 14_000),
            Some(first.baseline()),
        );
        feed.sender.send(first).unwrap();
        feed.sender.send(second).unwrap();
        let message = seen.recv().await.unwrap();
        assert_eq!(message.backend_id, id);
        assert_eq!((message.cpu_used, message.sys_cpu), (300, 4_000));
        assert_eq!((message.mem_used, message.mem_limit), (8, 100));
        stop_tx.send(true).unwrap();
        forwarder.await.unwrap();
        assert!(
            seen.try_recv().is_err(),
            "the first sample has no CPU deltas"
        );
    }

    #[test]
    fn counters_going_backwards_give_no_deltas() {
        let id = BackendName::parse("ba-cpu").unwrap();
        let base = CpuBaseline {
            cpu_total_ns: 900,
            sys_cpu_total_ns: 10_000,
        };
        let sample = MetricsSample::from_reading(id, 2, &reading(100, 12_000), Some(base));
        assert_eq!((sample.cpu_used, sample.sys_cpu), (None, None));
    }
}
