//! Resource limits as the created container gets them: memory with swap
//! capped to the same figure, CPU period and quota, the `cpu` ulimit — read
//! back with `docker inspect` and from inside the container; a disk limit the
//! storage driver cannot honour ends the backend with Docker's error; and a
//! backend killed by the OOM killer is recorded with exit code 137 and
//! `oom_killed`.

use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;

const READY_WITHIN: Duration = Duration::from_secs(90);
const MEMORY: i64 = 64 * 1024 * 1024;

fn inspect(container: &str) -> Value {
    let text = docker(&["inspect", container]);
    let mut all: Vec<Value> = serde_json::from_str(&text).unwrap();
    all.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_limits_reach_the_container_as_docker_and_the_kernel_report_them() {
    let daemon = Daemon::start().await;
    // The backend publishes what its own cgroup and ulimit say, then serves it.
    let report = "m=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max); \
                  q=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d' ' -f1 /sys/fs/cgroup/cpu.max); \
                  p=$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us 2>/dev/null || cut -d' ' -f2 /sys/fs/cgroup/cpu.max); \
                  mkdir -p /tmp/www && echo \"$m $q $p $(ulimit -t)\" > /tmp/www/limits && exec httpd -f -p $PORT -h /tmp/www";
    let id = daemon
        .spawn_executable(json!({
            "image": test_image(),
            "command": ["sh", "-c", report],
            "resource_limits": {
                "memory_limit_bytes": MEMORY,
                "cpu_period": 50_000,
                "cpu_period_percent": 50,
                "cpu_time_limit": 30
            }
        }))
        .await;
    let ready = daemon.wait_status(&id, "ready", READY_WITHIN).await;

    let host = inspect(ready["container_id"].as_str().unwrap())["HostConfig"].clone();
    assert_eq!(host["Memory"], MEMORY);
    assert_eq!(
        host["MemorySwap"], MEMORY,
        "no swap beyond the memory limit"
    );
    assert_eq!(host["CpuPeriod"], 50_000);
    assert_eq!(host["CpuQuota"], 25_000);
    assert_eq!(
        host["Ulimits"],
        json!([{"Name": "cpu", "Soft": 30, "Hard": 30}])
    );
    let address = ready["address"].as_str().unwrap();
    let seen = reqwest::get(format!("http://{address}/limits"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(seen.trim(), format!("{MEMORY} 25000 50000 30"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_limit_the_storage_driver_cannot_honour_ends_the_backend_with_dockers_error() {
    let daemon = Daemon::start().await;
    // Ask the engine itself whether it can limit a container's disk.
    let probe = std::process::Command::new("docker")
        .args(["create", "--storage-opt", "size=64m", test_image(), "true"])
        .output()
        .unwrap();
    let supported = probe.status.success();
    if supported {
        let created = String::from_utf8_lossy(&probe.stdout).trim().to_string();
        docker(&["rm", "-f", &created]);
    }

    let id = daemon
        .spawn_executable(json!({
            "image": test_image(),
            "resource_limits": {"disk_limit_bytes": 64 * 1024 * 1024}
        }))
        .await;

    if supported {
        let ready = daemon.wait_status(&id, "ready", READY_WITHIN).await;
        let host = inspect(ready["container_id"].as_str().unwrap())["HostConfig"].clone();
        assert_eq!(host["StorageOpt"], json!({"size": "67108864"}));
        return;
    }
    let dockers_words = String::from_utf8_lossy(&probe.stderr)
        .trim()
        .trim_start_matches("Error response from daemon: ")
        .to_string();
    let done = daemon.wait_status(&id, "terminated", READY_WITHIN).await;
    assert_eq!(done["state"]["reason"], "internalerror", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(
        error.starts_with("cannot create container: docker refused ("),
        "{error}"
    );
    assert!(
        error.contains(&dockers_words),
        "{error} lacks {dockers_words:?}"
    );
    assert!(
        error.ends_with("(executable.resource_limits.disk_limit_bytes needs a storage driver that supports a size limit, e.g. overlay2 on xfs mounted with pquota)"),
        "{error}"
    );
    let last = daemon.events(&id).await.pop().unwrap();
    assert_eq!(last["error"], error);
    assert_eq!(
        daemon.statuses(&id).await,
        ["scheduled", "loading", "starting", "terminated"]
    );
    assert!(daemon.containers().is_empty(), "no container was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_over_its_memory_limit_is_recorded_oom_killed_with_exit_137() {
    let daemon = Daemon::start().await;
    // Serve (so it can get ready), then grow a string without bound.
    let id = daemon
        .spawn_executable(json!({
            "image": test_image(),
            "command": ["sh", "-c", "httpd -p $PORT -h /www; x=a; while true; do x=$x$x; done"],
            "resource_limits": {"memory_limit_bytes": 8 * 1024 * 1024}
        }))
        .await;

    let done = daemon.wait_status(&id, "terminated", READY_WITHIN).await;

    assert_eq!(done["exit_code"], 137, "{done}");
    assert_eq!(done["oom_killed"], true, "{done}");
    assert_eq!(
        daemon
            .query_one(&format!(
                "SELECT oom_killed FROM backends WHERE id = '{id}'"
            ))
            .await,
        1
    );
    let container = done["container_id"].as_str().unwrap();
    assert_eq!(inspect(container)["State"]["OOMKilled"], true);
    let last = daemon.events(&id).await.pop().unwrap();
    assert_eq!(last["exit_code"], 137);
}
