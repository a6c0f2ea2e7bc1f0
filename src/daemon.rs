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
use crate::reconciler::{Reconciler, ReconcilerSettings};
use crate::store::{Store, StoreError};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;

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
    let executor = Executor {
        store: store.clone(),
        docker: docker.clone(),
        settings: ExecutorSettings::from_config(&config),
    };
    let reconciler = Reconciler::new(
        executor,
        ReconcilerSettings {
            resync_interval: config.reconcile.resync_interval,
        },
    );
    let status = reconciler.status();
    status.docker_up.store(true, Ordering::Relaxed);
    let state = ApiState {
        store: store.clone(),
        config: Arc::new(config.clone()),
        reconciler: status,
        docker_endpoint: docker.endpoint().to_string(),
    };
    let addr = listener.local_addr().map_err(DaemonError::Serve)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let loop_stop = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let reconcile = tokio::spawn(reconciler.run(loop_stop));
    tracing::info!(
        listen = %addr,
        instance = store.instance_id(),
        db = %config.db_path.display(),
        docker = docker.endpoint(),
        "drover serving"
    );
    let api_stop = {
        let mut rx = stop_rx;
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let server = axum::serve(listener, api::router(state)).with_graceful_shutdown(api_stop);
    let trigger = async move {
        shutdown.await;
        tracing::info!("shutting down; containers are left running");
        let _ = stop_tx.send(true);
    };
    let (served, ()) = tokio::join!(async { server.await }, trigger);
    let _ = reconcile.await;
    store.close().await;
    served.map_err(DaemonError::Serve)
}
