//! `drover check`: compares what the database records with what Docker shows,
//! and lists every discrepancy between them.
//!
//! [`compare`] is pure: it takes the rows, their history and this instance's
//! containers and returns the discrepancies, so each rule is unit-tested with
//! tables. [`run`] gathers those facts (the database read-only, first; then one
//! list call and an inspect per stopped container) and never changes anything,
//! in the database or in Docker.
//!
//! On a running daemon the two reads are a few milliseconds apart, so a
//! transition happening at that instant can show up as a discrepancy (e.g. an
//! exit Docker already reports but drover has not yet recorded); one that is
//! still there on a second run is real.

use crate::docker::{DockerClient, DockerError};
use crate::model::{BackendRow, BackendStatus, ObservedContainer, RunState};
use crate::store::{ReadOnlyStore, StoreError};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Docker(#[from] DockerError),
}

/// One way the database and Docker disagree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Discrepancy {
    /// A container labelled with this instance whose backend has no row.
    OrphanContainer { backend: String, container_id: String },
    /// More than one container for one backend (names are deterministic, so
    /// drover never makes a second one).
    DuplicateContainers {
        backend: String,
        container_ids: Vec<String>,
    },
    /// A backend whose status says its container exists, and none does.
    MissingContainer {
        backend: String,
        status: BackendStatus,
    },
    /// The backend's container is not the one its row records.
    ContainerMismatch {
        backend: String,
        recorded: String,
        found: String,
    },
    /// A stopped container whose backend is not recorded as terminated.
    UnrecordedExit {
        backend: String,
        container_id: String,
        status: BackendStatus,
        exit_code: Option<i32>,
    },
    /// A backend recorded as terminated while its container still runs.
    RunningAfterTerminated {
        backend: String,
        container_id: String,
    },
    /// The recorded exit code is not the one Docker reports.
    ExitCodeMismatch {
        backend: String,
        container_id: String,
        recorded: Option<i32>,
        actual: Option<i32>,
    },
    /// The backend's history is not one pass through the lifecycle ending at
    /// its current status (a duplicate, a step back, or a missing row).
    BadHistory {
        backend: String,
        statuses: Vec<String>,
        problem: String,
    },
    /// `PRAGMA integrity_check` did not answer `ok`.
    DatabaseIntegrity { detail: String },
}

impl Discrepancy {
    pub fn kind(&self) -> &'static str {
        match self {
            Discrepancy::OrphanContainer { .. } => "orphan_container",
            Discrepancy::DuplicateContainers { .. } => "duplicate_containers",
            Discrepancy::MissingContainer { .. } => "missing_container",
            Discrepancy::ContainerMismatch { .. } => "container_mismatch",
            Discrepancy::UnrecordedExit { .. } => "unrecorded_exit",
            Discrepancy::RunningAfterTerminated { .. } => "running_after_terminated",
            Discrepancy::ExitCodeMismatch { .. } => "exit_code_mismatch",
            Discrepancy::BadHistory { .. } => "bad_history",
            Discrepancy::DatabaseIntegrity { .. } => "database_integrity",
        }
    }

    /// The backend concerned, if any.
    pub fn backend(&self) -> Option<&str> {
        match self {
            Discrepancy::OrphanContainer { backend, .. }
            | Discrepancy::DuplicateContainers { backend, .. }
            | Discrepancy::MissingContainer { backend, .. }
            | Discrepancy::ContainerMismatch { backend, .. }
            | Discrepancy::UnrecordedExit { backend, .. }
            | Discrepancy::RunningAfterTerminated { backend, .. }
            | Discrepancy::ExitCodeMismatch { backend, .. }
            | Discrepancy::BadHistory { backend, .. } => Some(backend),
            Discrepancy::DatabaseIntegrity { .. } => None,
        }
    }

    /// The container concerned (several, comma-separated), if any.
    pub fn container(&self) -> String {
        match self {
            Discrepancy::OrphanContainer { container_id, .. }
            | Discrepancy::UnrecordedExit { container_id, .. }
            | Discrepancy::RunningAfterTerminated { container_id, .. }
            | Discrepancy::ExitCodeMismatch { container_id, .. } => short(container_id).to_string(),
            Discrepancy::ContainerMismatch { found, .. } => short(found).to_string(),
            Discrepancy::DuplicateContainers { container_ids, .. } => container_ids
                .iter()
                .map(|id| short(id))
                .collect::<Vec<_>>()
                .join(","),
            Discrepancy::MissingContainer { .. }
            | Discrepancy::BadHistory { .. }
            | Discrepancy::DatabaseIntegrity { .. } => String::new(),
        }
    }

    /// A one-line explanation for people.
    pub fn detail(&self) -> String {
        let code = |c: &Option<i32>| c.map_or("none".to_string(), |c| c.to_string());
        match self {
            Discrepancy::OrphanContainer { .. } => "container of this instance without a backend row".into(),
            Discrepancy::DuplicateContainers { container_ids, .. } => {
                format!("{} containers for one backend", container_ids.len())
            }
            Discrepancy::MissingContainer { status, .. } => {
                format!("backend is {status} but has no container")
            }
            Discrepancy::ContainerMismatch { recorded, .. } => {
                format!("row records container {}", short(recorded))
            }
            Discrepancy::UnrecordedExit {
                status, exit_code, ..
            } => format!(
                "container exited (code {}) but backend is still {status}",
                code(exit_code)
            ),
            Discrepancy::RunningAfterTerminated { .. } => {
                "backend is terminated but its container runs".into()
            }
            Discrepancy::ExitCodeMismatch {
                recorded, actual, ..
            } => format!(
                "recorded exit code {}, docker reports {}",
                code(recorded),
                code(actual)
            ),
            Discrepancy::BadHistory {
                statuses, problem, ..
            } => format!("{problem}: {}", statuses.join(" > ")),
            Discrepancy::DatabaseIntegrity { detail } => format!("integrity_check: {detail}"),
        }
    }
}

fn short(container_id: &str) -> &str {
    &container_id[..container_id.len().min(12)]
}

/// What `drover check` found, and how much it looked at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub instance_id: String,
    /// Backend rows, terminated ones included.
    pub backends: usize,
    /// Backend rows not yet terminated.
    pub live_backends: usize,
    /// Containers labelled with this instance.
    pub containers: usize,
    /// Stopped containers whose exit was compared with the database.
    pub exits_checked: usize,
    pub discrepancies: Vec<Discrepancy>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.discrepancies.is_empty()
    }
}

/// Statuses in which a backend's container must exist.
fn has_container(status: BackendStatus) -> bool {
    matches!(
        status,
        BackendStatus::Waiting
            | BackendStatus::Ready
            | BackendStatus::Terminating
            | BackendStatus::HardTerminating
    )
}

fn rank(status: BackendStatus) -> usize {
    BackendStatus::ALL
        .iter()
        .position(|s| *s == status)
        .expect("every status is in ALL")
}

/// Why a history is not one pass through the lifecycle ending at `current`.
fn history_problem(statuses: &[String], current: BackendStatus) -> Option<String> {
    let mut parsed = Vec::with_capacity(statuses.len());
    for raw in statuses {
        match BackendStatus::parse(raw) {
            Some(status) => parsed.push(status),
            None => return Some(format!("unknown status {raw:?}")),
        }
    }
    match parsed.first() {
        None => return Some("no history rows".into()),
        Some(BackendStatus::Scheduled) => {}
        Some(other) => return Some(format!("history starts at {other}, not scheduled")),
    }
    if let Some(pair) = parsed.windows(2).find(|pair| rank(pair[1]) <= rank(pair[0])) {
        return Some(if pair[0] == pair[1] {
            format!("{} recorded twice", pair[0])
        } else {
            format!("{} after {}", pair[1], pair[0])
        });
    }
    let last = *parsed.last().expect("not empty");
    (last != current).then(|| format!("history ends at {last} but the backend is {current}"))
}

/// Every discrepancy between the rows (with their history) and the containers
/// Docker lists for this instance. `containers` carry their exit (from
/// inspect) when stopped.
pub fn compare(
    rows: &[BackendRow],
    histories: &HashMap<String, Vec<String>>,
    containers: &[ObservedContainer],
) -> Vec<Discrepancy> {
    let mut found = Vec::new();
    let mut by_backend: BTreeMap<&str, Vec<&ObservedContainer>> = BTreeMap::new();
    for container in containers {
        by_backend
            .entry(container.backend.as_str())
            .or_default()
            .push(container);
    }
    let known: HashMap<&str, &BackendRow> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
    for (backend, list) in &by_backend {
        if !known.contains_key(backend) {
            found.extend(list.iter().map(|c| Discrepancy::OrphanContainer {
                backend: backend.to_string(),
                container_id: c.container_id.clone(),
            }));
        }
    }
    for row in rows {
        let backend = row.id.as_str().to_string();
        let status = row.status();
        let empty = Vec::new();
        let history = histories.get(row.id.as_str()).unwrap_or(&empty);
        if let Some(problem) = history_problem(history, status) {
            found.push(Discrepancy::BadHistory {
                backend: backend.clone(),
                statuses: history.clone(),
                problem,
            });
        }
        let list = by_backend.get(row.id.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        let container = match list {
            [] => {
                if has_container(status) {
                    found.push(Discrepancy::MissingContainer { backend, status });
                }
                continue;
            }
            [one] => *one,
            many => {
                found.push(Discrepancy::DuplicateContainers {
                    backend,
                    container_ids: many.iter().map(|c| c.container_id.clone()).collect(),
                });
                continue;
            }
        };
        let container_id = container.container_id.clone();
        if let Some(recorded) = &row.container_id {
            if *recorded != container_id {
                found.push(Discrepancy::ContainerMismatch {
                    backend,
                    recorded: recorded.clone(),
                    found: container_id,
                });
                continue;
            }
        }
        let exit_code = container.exit.and_then(|e| e.exit_code);
        match (container.run_state, status == BackendStatus::Terminated) {
            (RunState::Exited, false) => found.push(Discrepancy::UnrecordedExit {
                backend,
                container_id,
                status,
                exit_code,
            }),
            // A backend ended by an internal error records no exit code (its
            // container may never have run properly): nothing to compare.
            (RunState::Exited, true) if row.exit_code != exit_code && row.error.is_none() => {
                found.push(Discrepancy::ExitCodeMismatch {
                    backend,
                    container_id,
                    recorded: row.exit_code,
                    actual: exit_code,
                })
            }
            (RunState::Running, true) => {
                found.push(Discrepancy::RunningAfterTerminated {
                    backend,
                    container_id,
                })
            }
            _ => {}
        }
    }
    found
}

/// Reads the database (read-only), then Docker, and compares them.
pub async fn run(store: &ReadOnlyStore, docker: &DockerClient) -> Result<CheckReport, CheckError> {
    let rows = store.all_backends().await?;
    let histories = store.history_statuses().await?;
    let integrity = store.integrity_check().await?;
    let mut containers = docker.list_managed().await?;
    let mut exits_checked = 0;
    for container in containers
        .iter_mut()
        .filter(|c| c.run_state == RunState::Exited)
    {
        if let Some(inspected) = docker.inspect(&container.container_id).await? {
            container.exit = inspected.exit;
            exits_checked += 1;
        }
    }
    let mut discrepancies = Vec::new();
    if integrity != "ok" {
        discrepancies.push(Discrepancy::DatabaseIntegrity { detail: integrity });
    }
    discrepancies.extend(compare(&rows, &histories, &containers));
    Ok(CheckReport {
        instance_id: store.instance_id().to_string(),
        backends: rows.len(),
        live_backends: rows.iter().filter(|r| !r.status().is_terminal()).count(),
        containers: containers.len(),
        exits_checked,
        discrepancies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        BackendName, BackendState, Desired, EventSource, ExecutorSpec, ObservedExit,
        TerminationReason,
    };

    fn row(id: &str, state: BackendState, container: Option<&str>) -> BackendRow {
        let exit_code = match &state {
            BackendState::Terminated { exit_code, .. } => *exit_code,
            _ => None,
        };
        BackendRow {
            id: BackendName::parse(id).unwrap(),
            spec: ExecutorSpec::from_json(serde_json::json!({"image": "busybox"})).unwrap(),
            desired: Desired::Running,
            requested_termination: None,
            state,
            container_id: container.map(str::to_string),
            exit_code,
            oom_killed: None,
            error: None,
            startup_deadline: None,
            kill_deadline: None,
            last_signal: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn ready() -> BackendState {
        BackendState::Ready {
            address: Some("127.0.0.1:4000".into()),
        }
    }

    fn terminated(code: Option<i32>) -> BackendState {
        ready().to_terminated(None, code)
    }

    fn container(id: &str, backend: &str, run_state: RunState, code: Option<i32>) -> ObservedContainer {
        ObservedContainer {
            container_id: id.into(),
            backend: BackendName::parse(backend).unwrap(),
            run_state,
            host_port: None,
            exit: (run_state == RunState::Exited).then_some(ObservedExit {
                exit_code: code,
                finished_at: 1,
                oom_killed: false,
                source: EventSource::Inspect,
            }),
        }
    }

    fn history(rows: &[BackendRow]) -> HashMap<String, Vec<String>> {
        // The lifecycle up to the row's status (through ready when terminated).
        let path = |status: BackendStatus| -> Vec<String> {
            let mut path: Vec<BackendStatus> = BackendStatus::ALL
                .into_iter()
                .take_while(|s| rank(*s) <= rank(status).min(rank(BackendStatus::Ready)))
                .collect();
            if status == BackendStatus::Terminated {
                path.push(status);
            }
            path.into_iter().map(|s| s.as_str().to_string()).collect()
        };
        rows.iter()
            .map(|r| (r.id.to_string(), path(r.status())))
            .collect()
    }

    fn kinds(rows: &[BackendRow], containers: &[ObservedContainer]) -> Vec<&'static str> {
        compare(rows, &history(rows), containers)
            .iter()
            .map(Discrepancy::kind)
            .collect()
    }

    #[test]
    fn each_disagreement_is_named() {
        use RunState::{Created, Exited, Running};
        let none: &[&str] = &[];
        let table: Vec<(BackendRow, Vec<ObservedContainer>, &[&str])> = vec![
            // Agreements.
            (row("ba-a", ready(), Some("c1")), vec![container("c1", "ba-a", Running, None)], none),
            (
                row("ba-a", terminated(Some(137)), Some("c1")),
                vec![container("c1", "ba-a", Exited, Some(137))],
                none,
            ),
            (row("ba-a", terminated(None), Some("c1")), vec![], none),
            (row("ba-a", BackendState::Starting, None), vec![], none),
            (row("ba-a", BackendState::Starting, None), vec![container("c1", "ba-a", Created, None)], none),
            // Disagreements.
            (row("ba-a", ready(), Some("c1")), vec![], &["missing_container"]),
            (
                row("ba-a", ready(), Some("c1")),
                vec![container("c1", "ba-a", Running, None), container("c2", "ba-a", Created, None)],
                &["duplicate_containers"],
            ),
            (
                row("ba-a", ready(), Some("c1")),
                vec![container("c2", "ba-a", Running, None)],
                &["container_mismatch"],
            ),
            (
                row("ba-a", ready(), Some("c1")),
                vec![container("c1", "ba-a", Exited, Some(3))],
                &["unrecorded_exit"],
            ),
            (
                row("ba-a", terminated(Some(0)), Some("c1")),
                vec![container("c1", "ba-a", Running, None)],
                &["running_after_terminated"],
            ),
            (
                row("ba-a", terminated(Some(143)), Some("c1")),
                vec![container("c1", "ba-a", Exited, Some(137))],
                &["exit_code_mismatch"],
            ),
            (
                row("ba-a", ready(), Some("c1")),
                vec![container("c1", "ba-a", Running, None), container("c9", "ba-zz", Running, None)],
                &["orphan_container"],
            ),
        ];
        for (row, containers, expected) in table {
            assert_eq!(
                kinds(std::slice::from_ref(&row), &containers),
                expected,
                "row {:?} containers {containers:?}",
                row.state
            );
        }
    }

    #[test]
    fn internal_error_rows_have_no_exit_code_to_compare() {
        let mut failed = row("ba-a", BackendState::Starting.to_terminated(None, None), Some("c1"));
        failed.error = Some("docker refused".into());
        let exited = container("c1", "ba-a", RunState::Exited, Some(127));
        assert_eq!(kinds(&[failed], &[exited]), Vec::<&str>::new());
    }

    #[test]
    fn history_must_be_one_pass_through_the_lifecycle() {
        let statuses = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = statuses(&["scheduled", "loading", "starting", "waiting", "ready", "terminating", "terminated"]);
        assert_eq!(history_problem(&ok, BackendStatus::Terminated), None);
        assert_eq!(
            history_problem(&statuses(&["scheduled", "terminated"]), BackendStatus::Terminated),
            None
        );
        assert_eq!(
            history_problem(&statuses(&["scheduled", "loading", "loading"]), BackendStatus::Loading),
            Some("loading recorded twice".into())
        );
        assert_eq!(
            history_problem(&statuses(&["scheduled", "ready", "waiting"]), BackendStatus::Waiting),
            Some("waiting after ready".into())
        );
        assert_eq!(
            history_problem(&statuses(&["loading"]), BackendStatus::Loading),
            Some("history starts at loading, not scheduled".into())
        );
        assert_eq!(
            history_problem(&statuses(&["scheduled", "loading"]), BackendStatus::Starting),
            Some("history ends at loading but the backend is starting".into())
        );
        assert_eq!(history_problem(&[], BackendStatus::Scheduled), Some("no history rows".into()));
        let mut rows = vec![row("ba-a", ready(), Some("c1"))];
        rows[0].state = BackendState::Terminated {
            last_status: BackendStatus::Ready,
            termination: None,
            reason: Some(TerminationReason::Lost),
            exit_code: None,
        };
        let mut histories = history(&rows);
        histories.get_mut("ba-a").unwrap().pop();
        let found = compare(&rows, &histories, &[]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind(), "bad_history");
    }

    #[test]
    fn report_serializes_with_kind_tags() {
        let value = serde_json::to_value(Discrepancy::MissingContainer {
            backend: "ba-a".into(),
            status: BackendStatus::Ready,
        })
        .unwrap();
        assert_eq!(
            value,
            serde_json::json!({"kind": "missing_container", "backend": "ba-a", "status": "ready"})
        );
    }
}
