//! `drover serve`: wires the store, the Docker adapter, the reconciler and the
//! API together and runs them until shutdown.
//!
//! Everything the daemon needs is passed in (config, listener, shutdown), so
//! tests run it exactly as `main` does. Shutdown stops the loop and the API
//! and leaves every container running: the next start adopts them.

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::docker::{DockerClient, DockerError};
use crate::executor::{Executor, ExecutorSettings};
use crate::metrics::{MetricsFeed, Sampler};
use crate::reconciler::{Reconciler, ReconcilerSettings, ReconcilerStatus};
use crate::runtime::MetricsSubscribers;
use crate::store::{Store, StoreError};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("http server failed: {0}")]
    Serve(std::io::Error),
}

/// Opens the store, connects to Docker and binds the API, then serves until
/// `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), DaemonError> {
    let store = Store::open(&config.db_path).await?;
    let docker = DockerClient::connect(store.instance_id()).await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: config.listen,
            source,
        })?;
    serve(config, listener, store, docker, shutdown).await
}

/// Serves on an already-bound listener with an open store and Docker client.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    store: Store,
    docker: DockerClient,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let background = Background::start(&config, &store, &docker);
    let state = ApiState {
        store: store.clone(),
        config: Arc::new(config.clone()),
        reconciler: background.reconciler.clone(),
        docker_endpoint: docker.endpoint().to_string(),
        shutdown: background.stop_signal(),
        docker: docker.clone(),
        telemetry: api::metrics::Telemetry::new(background.samples.clone()),
        prune: background.prune.clone(),
    };
    let addr = listener.local_addr().map_err(DaemonError::Serve)?;
    tracing::info!(
        listen = %addr,
        instance = store.instance_id(),
        db = %config.db_path.display(),
        docker = docker.endpoint(),
        "drover serving"
    );
    let server =
        axum::serve(listener, api::router(state)).with_graceful_shutdown(background.stopped());
    let trigger = async {
        shutdown.await;
        tracing::info!("shutting down; containers are left running");
        background.request_stop();
    };
    let (served, ()) = tokio::join!(async { server.await }, trigger);
    background.stop().await;
    store.close().await;
    served.map_err(DaemonError::Serve)
}

/// The daemon's background work on an open store and Docker client (the
/// reconcile loop), started and stopped together. `serve` and the in-process
/// [`crate::runtime::DroverRuntime`] both run it, so an embedded drover is
/// wired exactly like the daemon.
pub struct Background {
    pub reconciler: Arc<ReconcilerStatus>,
    /// Receivers of metrics samples (the runtime facade's `metrics_callback`).
    pub metrics: MetricsSubscribers,
    /// The resource sampler's output: every sample appended to `metrics_samples`.
    pub samples: MetricsFeed,
    /// Asks the prune task for a pass now.
    pub prune: crate::prune::PruneHandle,
    stop_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Background {
    /// Starts the background tasks; they run until [`Self::stop`].
    pub fn start(config: &Config, store: &Store, docker: &DockerClient) -> Self {
        let (stop_tx, _) = watch::channel(false);
        let mut prune_stop = stop_tx.subscribe();
        let (prune, prune_task) = crate::prune::spawn(store.clone(), docker.clone(), &config.prune, async move {
            let _ = prune_stop.wait_for(|stop| *stop).await;
        });
        let mut background = Self {
            reconciler: Arc::default(),
            metrics: MetricsSubscribers::default(),
            samples: MetricsFeed::default(),
            prune,
            stop_tx,
            tasks: vec![prune_task],
        };
        let executor = Executor {
            store: store.clone(),
            docker: docker.clone(),
            settings: ExecutorSettings::from_config(config),
        };
        let reconciler = Reconciler::new(
            executor,
            ReconcilerSettings {
                resync_interval: config.reconcile.resync_interval,
            },
        );
        background.reconciler = reconciler.status();
        background.reconciler.docker_up.store(true, Ordering::Relaxed);
        let stopped = background.stopped();
        background.tasks.push(tokio::spawn(reconciler.run(stopped)));
        let sampler = Sampler::new(store.clone(), docker.clone(), &config.metrics);
        background.samples = sampler.feed();
        background.tasks.push(tokio::spawn(crate::metrics::forward(
            sampler.feed(),
            background.metrics.clone(),
            background.stopped(),
        )));
        background.tasks.push(tokio::spawn(sampler.run(background.stopped())));
        background
    }

    /// A receiver that turns `true` when the stop is requested.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop_tx.subscribe()
    }

    /// Resolves when the stop is requested: the shutdown future for a task.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stop = self.stop_signal();
        async move {
            let _ = stop.wait_for(|stop| *stop).await;
        }
    }

    /// Asks every task to stop, without waiting for them.
    pub fn request_stop(&self) {
        self.stop_tx.send_replace(true);
    }

    /// Stops every task and waits until they have finished.
    pub async fn stop(self) {
        self.request_stop();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
