//! Faults of the environment, made real: the database's disk filling up (a
//! small tmpfs), the Docker engine becoming unreachable after start (a unix
//! socket proxy to the engine that the test stops and starts, so the shared
//! engine is never touched), and containers Docker refuses to create or start.

use crate::support::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

const READY_WITHIN: Duration = Duration::from_secs(90);

/// A tmpfs of `size` mounted on a fresh temp dir; unmounted and removed when
/// dropped (after the daemon using it, which is declared later).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let path = tempfile::tempdir().unwrap().keep();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs failed (root needed)");
        Tmpfs { path }
    }

    /// Writes zeros to `filler` until the tmpfs is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // Small writes too, until not one byte fits.
        while file.write(&[0u8]).is_ok_and(|n| n == 1) {}
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_spawn_503_writes_nothing_and_everything_recovers_with_space() {
    let tmpfs = Tmpfs::mount("16m");
    let dir = tempfile::tempdir_in(&tmpfs.path).unwrap();
    // The log lives on a real disk, so it can tell what happened while the tmpfs was full.
    let logs = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        logs.path().join("daemon.log"),
        dir.path().join("daemon.log"),
    )
    .unwrap();
    let daemon = Daemon::start_in(dir, DaemonConfig::default()).await;
    let running = daemon.spawn(None).await;
    let ready = daemon.wait_status(&running, "ready", READY_WITHIN).await;

    let filler = tmpfs.fill();
    let body = json!({ "id": "ba-diskfull", "executable": { "image": test_image() } });
    let (status, refused) = daemon.post("/v1/backends", body.clone()).await;
    // The backend dies while nothing can be recorded: the reconciler must keep trying.
    docker(&["kill", ready["container_id"].as_str().unwrap()]);
    let log_path = logs.path().join("daemon.log");
    wait_for(
        "a failed write of the exit, to be retried",
        READY_WITHIN,
        || async {
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    l.contains("action failed, will retry")
                        && l.contains(&running)
                        && l.contains("disk is full")
                })
        },
    )
    .await;

    assert_eq!(status, 503, "{refused}");
    assert_eq!(
        refused,
        json!({"error": "database unavailable: database or disk is full"})
    );
    let (missing, _) = daemon.get("/v1/backends/ba-diskfull").await;
    assert_eq!(missing, 404, "nothing half-written");
    assert_eq!(
        daemon
            .query_one("SELECT count(*) FROM backend_events WHERE backend_id = 'ba-diskfull'")
            .await,
        0
    );
    assert_eq!(
        daemon.backend(&running).await["status"],
        "ready",
        "the exit is not recorded yet"
    );

    std::fs::remove_file(filler).unwrap();
    let done = daemon
        .wait_status(&running, "terminated", READY_WITHIN)
        .await;
    assert_eq!(done["exit_code"], 137);
    let (status, created) = daemon.post("/v1/backends", body).await;
    assert_eq!(status, 201, "{created}");
    daemon
        .wait_status("ba-diskfull", "ready", READY_WITHIN)
        .await;
    drop(daemon);
    drop(tmpfs);
}

/// A unix socket forwarding every connection to the real Docker socket,
/// which the test can stop (closing every open connection) and start again.
struct DockerProxy {
    path: PathBuf,
    stop: watch::Sender<bool>,
}

const DOCKER_SOCKET: &str = "/var/run/docker.sock";

impl DockerProxy {
    fn start(path: &Path) -> DockerProxy {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind proxy socket");
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(async move {
            let mut accept_stop = stopped.clone();
            loop {
                let client = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => return,
                    },
                    _ = accept_stop.changed() => return,
                };
                let mut connection_stop = stopped.clone();
                tokio::spawn(async move {
                    let Ok(mut engine) = UnixStream::connect(DOCKER_SOCKET).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut engine) => {}
                        _ = connection_stop.changed() => {}
                    }
                });
            }
        });
        DockerProxy {
            path: path.to_path_buf(),
            stop,
        }
    }

    /// Closes the socket and every connection through it.
    fn stop(self) {
        let _ = self.stop.send(true);
        let _ = std::fs::remove_file(&self.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_unreachable_after_start_is_reported_by_healthz_and_recovered_from() {
    let sockets = tempfile::tempdir().unwrap();
    let socket = sockets.path().join("docker.sock");
    let proxy = DockerProxy::start(&socket);
    let endpoint = format!("unix://{}", socket.display());
    let daemon = Daemon::start_with(DaemonConfig {
        env: vec![("DOCKER_HOST".into(), endpoint.clone())],
        ..DaemonConfig::default()
    })
    .await;
    let before = daemon.spawn(None).await;
    daemon.wait_status(&before, "ready", READY_WITHIN).await;

    proxy.stop();
    wait_for("healthz to report docker down", READY_WITHIN, || async {
        daemon.get("/healthz").await.0 == 503
    })
    .await;
    let (_, down) = daemon.get("/healthz").await;
    // Desired state is still taken while the engine is away.
    let during = daemon.spawn(None).await;
    let outage = query_json(
        &daemon.db_path(),
        "SELECT noticed_by, ended_at_ms FROM docker_outages",
    )
    .await;

    assert_eq!(
        down,
        json!({"error": format!("docker engine unreachable at {endpoint}")})
    );
    assert_eq!(outage.len(), 1, "{outage:?}");
    assert_eq!(outage[0]["ended_at_ms"], serde_json::Value::Null);
    let status = daemon.backend(&during).await["status"].clone();
    assert!(status == "scheduled" || status == "loading", "{status}");

    let _proxy = DockerProxy::start(&socket);
    wait_for("healthz to recover", READY_WITHIN, || async {
        daemon.get("/healthz").await.0 == 200
    })
    .await;
    daemon.wait_status(&during, "ready", READY_WITHIN).await;
    assert_eq!(
        daemon.backend(&before).await["status"],
        "ready",
        "left running throughout"
    );
    let outage = query_json(&daemon.db_path(), "SELECT ended_at_ms FROM docker_outages").await;
    assert_eq!(outage.len(), 1);
    assert!(
        outage[0]["ended_at_ms"].is_i64(),
        "outage closed: {outage:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_docker_cannot_create_or_start_ends_with_dockers_error() {
    let daemon = Daemon::start().await;

    let no_network = daemon
        .spawn_executable(json!({"image": test_image(), "network_name": "drover-no-such-network"}))
        .await;
    let no_binary = daemon
        .spawn_executable(json!({"image": test_image(), "command": ["/no/such/binary"]}))
        .await;

    let create = daemon
        .wait_status(&no_network, "terminated", READY_WITHIN)
        .await;
    assert_eq!(create["state"]["reason"], "internalerror");
    // Docker creates the container and only finds the network missing at start.
    assert_eq!(
        create["error"],
        "cannot start container: not found: network drover-no-such-network not found"
    );
    let start = daemon
        .wait_status(&no_binary, "terminated", READY_WITHIN)
        .await;
    assert_eq!(start["state"]["reason"], "internalerror");
    let error = start["error"].as_str().unwrap();
    assert!(
        error.starts_with("cannot start container: docker refused (400): "),
        "{error}"
    );
    assert!(error.contains("/no/such/binary"), "{error}");
    for (id, done) in [(&no_network, &create), (&no_binary, &start)] {
        let last = daemon.events(id).await.pop().unwrap();
        assert_eq!(
            last["error"], done["error"],
            "the event keeps Docker's error"
        );
        assert_eq!(last["state"]["last_status"], "starting");
    }
}
