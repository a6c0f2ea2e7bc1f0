//! A daemon manages only its own instance's containers: one without drover's
//! labels, and one labelled for another drover instance, sharing the same
//! Docker engine, are never listed as its own, signalled or removed.

use crate::support::*;
use std::time::{Duration, Instant};

/// Foreign containers created by a test, removed when it ends.
struct Foreign(Vec<String>);

impl Drop for Foreign {
    fn drop(&mut self) {
        for id in &self.0 {
            let _ = try_docker(&["rm", "-f", id]);
        }
    }
}

/// `Running StartedAt Pid` of a container, to see it was never restarted or replaced.
fn run_state(container: &str) -> String {
    docker(&[
        "inspect",
        "-f",
        "{{.State.Running}} {{.State.StartedAt}} {{.State.Pid}}",
        container,
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_without_this_instances_label_are_untouched() {
    let image = test_image();
    let suffix = free_port();
    // Both would die of a SIGTERM (the trap), so any signal would show.
    let script = "trap 'exit 143' TERM; while true; do sleep 0.1; done";
    let unlabelled_name = format!("drover-it-unlabelled-{suffix}");
    let other_instance_name = format!("drover-it-other-instance-{suffix}");
    let mut foreign = Foreign(Vec::new());
    foreign.0.push(docker(&[
        "run",
        "-d",
        "--name",
        &unlabelled_name,
        image,
        "sh",
        "-c",
        script,
    ]));
    foreign.0.push(docker(&[
        "run",
        "-d",
        "--name",
        &other_instance_name,
        "--label",
        "dev.plane.backend=true",
        "--label",
        "dev.drover.instance=dr-someoneelse",
        "--label",
        "dev.drover.backend=ba-x",
        image,
        "sh",
        "-c",
        script,
    ]));
    let before: Vec<String> = foreign.0.iter().map(|id| run_state(id)).collect();
    assert!(before.iter().all(|s| s.starts_with("true ")), "{before:?}");

    // Arrange the daemon after them, so its first resync sees them too.
    let started = Instant::now();
    let daemon = Daemon::start_with(DaemonConfig {
        resync_interval: "500ms",
        soft_terminate_grace: "1s",
        ..DaemonConfig::default()
    })
    .await;
    // Its own backend lives and ends (SIGKILL after the 1 s grace) meanwhile.
    let id = daemon.spawn(None).await;
    daemon
        .wait_status(&id, "ready", Duration::from_secs(30))
        .await;
    assert_eq!(daemon.terminate(&id, false).await, 202);
    let done = daemon
        .wait_status(&id, "terminated", Duration::from_secs(30))
        .await;
    assert_eq!(done["exit_code"], 137);
    // Several resync intervals have passed over the foreign containers; the
    // wait is the point of the test (nothing must happen), not a condition.
    let several_resyncs = Duration::from_millis(4 * 500);
    if let Some(left) = several_resyncs.checked_sub(started.elapsed()) {
        tokio::time::sleep(left).await;
    }

    let after: Vec<String> = foreign.0.iter().map(|id| run_state(id)).collect();
    assert_eq!(
        after, before,
        "foreign containers were restarted, signalled or replaced"
    );
    for (name, id) in [&unlabelled_name, &other_instance_name]
        .into_iter()
        .zip(&foreign.0)
    {
        assert_eq!(
            &docker(&["inspect", "-f", "{{.Id}}", name]),
            id,
            "{name} is the same container"
        );
    }
    let own: Vec<String> = daemon
        .containers()
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert!(own.iter().all(|c| !foreign.0.contains(c)), "{own:?}");
    assert_eq!(
        daemon.query_one("SELECT count(*) FROM backends").await,
        1,
        "no row for a foreign container"
    );
    let (_, list) = daemon.get("/v1/backends").await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}
