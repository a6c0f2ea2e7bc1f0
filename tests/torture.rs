//! The crash torture test (issue 3): a random workload of spawns, soft and
//! hard terminations and `docker kill`s, with the daemon SIGKILLed at random
//! instants and restarted, then, once everything has settled, `drover check`
//! and the invariants:
//!
//! - every acknowledged spawn (`201`) has its backend row;
//! - each live backend has exactly one container, running, the one its row names;
//! - each stopped container's exit is recorded, once, with Docker's exit code;
//! - no backend is stuck in a non-final status while its container is gone;
//! - `PRAGMA integrity_check` is `ok` after every kill.
//!
//! Its size is `DROVER_TORTURE_ROUNDS` (default 3, the CI size); its random
//! choices come from `DROVER_TORTURE_SEED` (printed, random by default), so a
//! failing run's choices can be replayed (the timing of the machine cannot).
//! Run it big with
//! `DROVER_TORTURE_ROUNDS=200 cargo test --test torture -- --nocapture`.

#[path = "it/support/mod.rs"]
mod support;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// Live backends above which the workload terminates instead of spawning, so
/// a long run does not pile up containers.
const MAX_LIVE: usize = 12;
const SETTLE_WITHIN: Duration = Duration::from_secs(90);

fn env_number(name: &str) -> Option<u64> {
    let raw = std::env::var(name).ok()?;
    Some(raw.parse().unwrap_or_else(|_| panic!("{name} must be a number, got {raw:?}")))
}

/// What the workload knows and has counted.
#[derive(Default)]
struct Ledger {
    /// Spawns answered `201`: they must exist.
    acknowledged: BTreeSet<String>,
    /// Spawns sent without an answer (the daemon died): they may exist.
    unanswered: BTreeSet<String>,
    /// Backends believed live, to pick termination targets from.
    live: Vec<String>,
    kills: usize,
    spawns: usize,
    soft_terminations: usize,
    hard_terminations: usize,
    docker_kills: usize,
    docker_removals: usize,
}

fn random_id(rng: &mut StdRng) -> String {
    let suffix: String = (0..12)
        .map(|_| {
            let n = rng.gen_range(0..36u8);
            (if n < 26 { b'a' + n } else { b'0' + n - 26 }) as char
        })
        .collect();
    format!("ba-t{suffix}")
}

/// A random kind of backend: mostly the image's httpd; some end by themselves
/// after a while with a chosen code; some never listen (the startup timeout
/// ends them).
fn random_executable(rng: &mut StdRng) -> Value {
    let image = test_image();
    match rng.gen_range(0..10) {
        0..=5 => json!({ "image": image }),
        6..=8 => {
            let after = rng.gen_range(1..4);
            let code = rng.gen_range(0..5);
            let script = format!("httpd -p $PORT -h /www; sleep {after}; exit {code}");
            json!({ "image": image, "command": ["sh", "-c", script] })
        }
        _ => json!({ "image": image, "command": ["sleep", "3600"] }),
    }
}

fn container_of(backend: &str) -> Option<String> {
    let filter = format!("name=^/plane-{backend}$");
    try_docker(&["ps", "-a", "-q", "--no-trunc", "--filter", &filter])
        .and_then(|out| out.lines().next().map(str::to_string))
}

/// The daemon's API as the workload sees it: a client that outlives kills.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// One random operation against the daemon (which may be dying).
async fn operate(api: &Api, rng: &mut StdRng, ledger: &mut Ledger) {
    let roll = rng.gen_range(0..10);
    if roll < 5 && ledger.live.len() < MAX_LIVE || ledger.live.is_empty() {
        let id = random_id(rng);
        let body = json!({ "id": id, "executable": random_executable(rng) });
        ledger.spawns += 1;
        match api.http.post(api.url("/v1/backends")).json(&body).send().await {
            Ok(response) if response.status().as_u16() == 201 => {
                ledger.acknowledged.insert(id.clone());
                ledger.live.push(id);
            }
            Ok(response) => panic!("spawn of {id} answered {}", response.status()),
            Err(_) => {
                ledger.unanswered.insert(id.clone());
                ledger.live.push(id);
            }
        }
        return;
    }
    let target = ledger.live.swap_remove(rng.gen_range(0..ledger.live.len()));
    match roll {
        0..=6 | 9 => {
            let hard = roll == 9;
            if hard {
                ledger.hard_terminations += 1;
            } else {
                ledger.soft_terminations += 1;
            }
            let path = api.url(&format!("/v1/backends/{target}/terminate"));
            let _ = api.http.post(path).json(&json!({ "hard": hard })).send().await;
        }
        _ => {
            if let Some(container) = container_of(&target) {
                ledger.docker_kills += 1;
                let _ = try_docker(&["kill", &container]);
            }
        }
    }
}

/// Operates, with random pauses, until `stop` is set; hands the generator and
/// the ledger back.
async fn workload(api: Api, mut rng: StdRng, mut ledger: Ledger, stop: Arc<AtomicBool>) -> (StdRng, Ledger) {
    while !stop.load(Ordering::Relaxed) {
        operate(&api, &mut rng, &mut ledger).await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..150))).await;
    }
    (rng, ledger)
}

/// One random change to a container while the daemon is down.
fn operate_while_down(rng: &mut StdRng, ledger: &mut Ledger) {
    if ledger.live.is_empty() || rng.gen_bool(0.5) {
        return;
    }
    let target = ledger.live.swap_remove(rng.gen_range(0..ledger.live.len()));
    let Some(container) = container_of(&target) else {
        return;
    };
    if rng.gen_bool(0.8) {
        ledger.docker_kills += 1;
        let _ = try_docker(&["kill", &container]);
    } else {
        ledger.docker_removals += 1;
        let _ = try_docker(&["rm", "-f", &container]);
    }
}

async fn assert_integrity(daemon: &Daemon) {
    assert_eq!(daemon.query_one("PRAGMA integrity_check").await, "ok", "integrity_check");
}

async fn assert_acknowledged_exist(daemon: &Daemon, ledger: &Ledger) {
    let known: BTreeSet<String> = query_json(&daemon.db_path(), "SELECT id FROM backends")
        .await
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<&String> = ledger.acknowledged.difference(&known).collect();
    assert!(lost.is_empty(), "acknowledged spawns lost: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_lose_nothing_and_record_every_exit_once() {
    let rounds = env_number("DROVER_TORTURE_ROUNDS").unwrap_or(3);
    let seed = env_number("DROVER_TORTURE_SEED").unwrap_or_else(rand::random);
    println!("torture: {rounds} rounds, DROVER_TORTURE_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut daemon = Daemon::start_with(DaemonConfig {
        resync_interval: "300ms",
        soft_terminate_grace: "1s",
        startup_timeout: "5s",
        ..DaemonConfig::default()
    })
    .await;
    let mut ledger = Ledger::default();

    let api = Api {
        http: daemon.http.clone(),
        base: daemon.url(""),
    };
    for _ in 0..rounds {
        // The workload runs on its own; the daemon is SIGKILLed at a random
        // instant, whatever it or the workload is doing.
        let kill_after = Duration::from_millis(rng.gen_range(0..1_500));
        let stop = Arc::new(AtomicBool::new(false));
        let running = tokio::spawn(workload(api.clone(), rng, ledger, stop.clone()));
        tokio::time::sleep(kill_after).await;
        daemon.kill9();
        stop.store(true, Ordering::Relaxed);
        (rng, ledger) = running.await.expect("workload task");
        ledger.kills += 1;
        assert_integrity(&daemon).await;
        assert_acknowledged_exist(&daemon, &ledger).await;
        operate_while_down(&mut rng, &mut ledger);
        daemon.launch().await;
    }

    // Let everything settle: each backend ready or terminated.
    let settling = Instant::now();
    let deadline = settling + SETTLE_WITHIN;
    loop {
        let unsettled = query_json(
            &daemon.db_path(),
            "SELECT id, status FROM backends WHERE status NOT IN ('ready', 'terminated')",
        )
        .await;
        if unsettled.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled within {SETTLE_WITHIN:?} (seed {seed}): {unsettled:?}\nlog:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settled_after = settling.elapsed();

    // drover check: the database agrees with Docker.
    let output = std::process::Command::new(BIN)
        .args(["check", "--json", "--config"])
        .arg(daemon.config_path())
        .env_remove("DROVER_DB")
        .output()
        .expect("run drover check");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "drover check printed no report ({e}): {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(
        report["discrepancies"],
        json!([]),
        "drover check found discrepancies (seed {seed}):\n{}\nlog:\n{}",
        serde_json::to_string_pretty(&report).unwrap(),
        daemon.log()
    );
    assert!(output.status.success(), "drover check failed: {}", String::from_utf8_lossy(&output.stderr));

    // The invariants, checked here too, independently of drover check.
    assert_integrity(&daemon).await;
    assert_acknowledged_exist(&daemon, &ledger).await;
    let rows: BTreeMap<String, Value> = query_json(
        &daemon.db_path(),
        "SELECT b.id, b.status, b.container_id, b.exit_code, b.error, \
           (SELECT COUNT(*) FROM backend_events e WHERE e.backend_id = b.id AND e.status = 'terminated') AS terminated_rows \
         FROM backends b",
    )
    .await
    .into_iter()
    .map(|r| (r["id"].as_str().unwrap().to_string(), r))
    .collect();
    let mut containers_by_backend: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (container, name, state) in daemon.containers() {
        let backend = name.trim_start_matches("plane-").to_string();
        containers_by_backend.entry(backend).or_default().push((container, state));
    }
    let mut exits_checked = 0;
    let mut late_creates = 0;
    let mut broken: Vec<String> = Vec::new();
    for (id, row) in &rows {
        let status = row["status"].as_str().unwrap_or_default();
        let terminated = status == "terminated";
        let expected_terminated_rows = if terminated { 1 } else { 0 };
        if row["terminated_rows"] != expected_terminated_rows {
            broken.push(format!("{id}: {} terminated rows while {status}", row["terminated_rows"]));
        }
        let containers = containers_by_backend.remove(id).unwrap_or_default();
        match containers.as_slice() {
            [] if !terminated => broken.push(format!("{id} is {status} but its container is gone")),
            [] => {}
            [(container, state)] if row["container_id"].is_null() => {
                // A create sent just before a kill can finish after the
                // restarted daemon recorded the backend terminated (its
                // termination was requested meanwhile): a container that
                // never ran, and never will (only the dead process would
                // have started it).
                if !terminated || state != "created" {
                    broken.push(format!("{id} is {status} with unrecorded container {container} {state}"));
                }
                late_creates += 1;
            }
            [(container, state)] => {
                if row["container_id"].as_str() != Some(container.as_str()) {
                    broken.push(format!("{id} records container {} but has {container}", row["container_id"]));
                } else if !terminated && state != "running" {
                    broken.push(format!("{id} is {status} with its container {state}"));
                } else if terminated && state == "running" {
                    broken.push(format!("{id} is terminated but its container runs"));
                } else if terminated && state == "exited" && row["error"].is_null() {
                    let code: i64 = docker(&["inspect", "-f", "{{.State.ExitCode}}", container])
                        .parse()
                        .unwrap();
                    if row["exit_code"] != code {
                        broken.push(format!("{id} recorded exit {} but docker says {code}", row["exit_code"]));
                    }
                    exits_checked += 1;
                }
            }
            several => broken.push(format!("{id} has several containers: {several:?}")),
        }
    }
    for (backend, containers) in &containers_by_backend {
        broken.push(format!("containers without a backend row: {backend} {containers:?}"));
    }
    assert!(
        broken.is_empty(),
        "invariants broken (seed {seed}):\n{}\nlog:\n{}",
        broken.join("\n"),
        daemon.log()
    );

    let ready = rows.values().filter(|r| r["status"] == "ready").count();
    println!(
        "torture: seed {seed}, {rounds} rounds, {} daemon kills; {} spawns ({} acknowledged, {} unanswered), \
         {} soft and {} hard terminations, {} docker kills, {} docker removals; \
         {} backends ({ready} ready, {} terminated), {exits_checked} exits checked against docker, {late_creates} late creates, \
         drover check: {} backends, {} containers, {} exits checked; settled in {settled_after:?}, total {:?}",
        ledger.kills,
        ledger.spawns,
        ledger.acknowledged.len(),
        ledger.unanswered.len(),
        ledger.soft_terminations,
        ledger.hard_terminations,
        ledger.docker_kills,
        ledger.docker_removals,
        rows.len(),
        rows.len() - ready,
        report["backends"],
        report["containers"],
        report["exits_checked"],
        started.elapsed(),
    );
}
