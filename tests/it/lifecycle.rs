//! The normal life of a backend and each way it ends, through the HTTP API.

use crate::support::*;
use std::time::Duration;

const READY_WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_lives_scheduled_to_terminated_with_exact_history() {
    let daemon = Daemon::start().await;
    let id = daemon.spawn(None).await;
    let ready = daemon.wait_status(&id, "ready", READY_WITHIN).await;
    let address = ready["address"].as_str().unwrap().to_string();
    let page = reqwest::get(format!("http://{address}/")).await.unwrap().text().await.unwrap();
    assert_eq!(page, "hello from drover-test\n");

    assert_eq!(daemon.terminate(&id, false).await, 202);
    let done = daemon.wait_status(&id, "terminated", READY_WITHIN).await;
    // httpd as PID 1 ignores SIGTERM: the grace period ends in SIGKILL.
    assert_eq!(done["exit_code"], 137);
    assert_eq!(
        daemon.statuses(&id).await,
        ["scheduled", "loading", "starting", "waiting", "ready", "terminating", "terminated"]
    );
    let last = daemon.events(&id).await.pop().unwrap();
    assert_eq!(last["state"]["termination"], "soft");
    assert_eq!(last["state"]["reason"], "external");
    assert_eq!(last["state"]["last_status"], "ready");
}
