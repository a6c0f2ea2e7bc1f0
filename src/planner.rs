//! The reconciler's brain: a pure function from (desired rows, observed
//! containers, now) to the next action for each backend.
//!
//! No I/O, no async, no errors: every decision the reconciler makes is here and
//! is unit-tested with tables of cases. The executor only performs actions; it
//! decides nothing. Boot after a crash is just the first call to [`plan`].

use crate::model::{
    BackendRow, BackendStatus, Desired, Millis, ObservedContainer, ObservedExit, RunState,
    Signal, TerminationKind, TerminationReason,
};
use std::collections::HashMap;

/// How long after a SIGKILL to send it again if the container still runs.
pub const KILL_RETRY_MS: Millis = 2_000;

/// One step towards the desired state. Each is idempotent: performing it twice,
/// or after a crash half-way, converges to the same place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Record `loading` if still `scheduled`, make the image available per the
    /// pull policy, then record `starting`.
    PrepareImage,
    /// Create the container (deterministic name, so never twice), start it,
    /// look up its port and record `waiting`.
    CreateContainer,
    /// Start an existing, never-started container and record `waiting`.
    StartContainer { container_id: String },
    /// The container runs but the store does not know yet (a crash after
    /// `start`): record `waiting` with its port.
    AdoptRunning {
        container_id: String,
        host_port: Option<u16>,
    },
    /// Probe readiness until `deadline`, then record `ready`.
    Probe {
        container_id: String,
        address: String,
        deadline: Millis,
    },
    /// Record `terminating` and send SIGTERM.
    BeginSoftTermination {
        container_id: String,
        reason: TerminationReason,
    },
    /// Record `hard-terminating` and send SIGKILL.
    BeginHardTermination {
        container_id: String,
        reason: TerminationReason,
    },
    /// Send a signal again (no new transition): SIGTERM not known to be sent
    /// before a crash, or SIGKILL once a soft termination's grace ran out.
    Signal {
        container_id: String,
        signal: Signal,
    },
    /// The container stopped: record `terminated` with its exit. `exit` is
    /// `None` when the code must still be read with inspect.
    RecordExit {
        container_id: String,
        exit: Option<ObservedExit>,
    },
    /// The container vanished: record `terminated`, with the exit of its `die`
    /// event when one was seen, else reason `lost` and no code.
    RecordGone { exit: Option<ObservedExit> },
    /// Terminated before any container ran: record `terminated`, no exit code.
    RecordTerminatedUnstarted,
    /// Termination is desired and the container was created but never
    /// started: remove it (then [`Action::RecordTerminatedUnstarted`]). Not
    /// left in place, because a `start` sent by a process killed since may
    /// still be under way in Docker and would run it after `terminated`.
    RemoveUnstarted { container_id: String },
}

/// What the planner knows of the world besides the rows.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// This instance's containers, by backend.
    pub containers: HashMap<crate::model::BackendName, ObservedContainer>,
    /// Exits seen in `die` events, kept after the container is gone so a
    /// removed container's exit code is not lost.
    pub remembered_exits: HashMap<crate::model::BackendName, ObservedExit>,
}

/// The next action for each backend that needs one.
pub fn plan<'a>(
    backends: impl IntoIterator<Item = &'a BackendRow>,
    observed: &Observed,
    now: Millis,
) -> Vec<(crate::model::BackendName, Action)> {
    backends
        .into_iter()
        .filter_map(|row| {
            let container = observed.containers.get(&row.id);
            let remembered = observed.remembered_exits.get(&row.id).copied();
            plan_backend(row, container, remembered, now).map(|action| (row.id.clone(), action))
        })
        .collect()
}

/// The next action for one backend, or `None` when it is where it should be
/// (or waiting for a deadline: see [`next_deadline`]).
pub fn plan_backend(
    row: &BackendRow,
    container: Option<&ObservedContainer>,
    remembered_exit: Option<ObservedExit>,
    now: Millis,
) -> Option<Action> {
    use BackendStatus as S;
    let status = row.status();
    if status == S::Terminated {
        return None;
    }
    // A termination in progress means termination is desired, whatever the row says.
    let wants_termination = row.desired == Desired::Terminated
        || matches!(status, S::Terminating | S::HardTerminating);
    let requested = row
        .requested_termination
        .unwrap_or((TerminationKind::Soft, TerminationReason::External));

    let Some(container) = container else {
        return match status {
            S::Scheduled | S::Loading | S::Starting if wants_termination => {
                Some(Action::RecordTerminatedUnstarted)
            }
            S::Scheduled | S::Loading => Some(Action::PrepareImage),
            S::Starting => Some(Action::CreateContainer),
            _ => Some(Action::RecordGone {
                exit: remembered_exit,
            }),
        };
    };
    // The steady state, answered first: a ready backend whose container runs
    // needs nothing, and costs no allocation on every pass.
    if status == S::Ready && container.run_state == RunState::Running && !wants_termination {
        return None;
    }
    let container_id = container.container_id.clone();

    match container.run_state {
        RunState::Exited => Some(Action::RecordExit {
            container_id,
            exit: container.exit,
        }),
        RunState::Created => match status {
            _ if wants_termination => Some(Action::RemoveUnstarted { container_id }),
            S::Scheduled | S::Loading => Some(Action::PrepareImage),
            _ => Some(Action::StartContainer { container_id }),
        },
        RunState::Running if wants_termination => {
            plan_termination(row, status, requested, container_id, now)
        }
        RunState::Running => match status {
            S::Scheduled | S::Loading => Some(Action::PrepareImage),
            S::Starting => Some(Action::AdoptRunning {
                container_id,
                host_port: container.host_port,
            }),
            S::Waiting => {
                let deadline = row.startup_deadline.unwrap_or(Millis::MAX);
                if now >= deadline {
                    Some(Action::BeginHardTermination {
                        container_id,
                        reason: TerminationReason::StartupTimeout,
                    })
                } else {
                    Some(Action::Probe {
                        container_id,
                        address: row.state.address().unwrap_or_default().to_string(),
                        deadline,
                    })
                }
            }
            _ => None,
        },
    }
}

fn plan_termination(
    row: &BackendRow,
    status: BackendStatus,
    (kind, reason): (TerminationKind, TerminationReason),
    container_id: String,
    now: Millis,
) -> Option<Action> {
    let kill_due = || match row.last_signal {
        Some((Signal::Kill, at)) => now >= at.saturating_add(KILL_RETRY_MS),
        _ => true,
    };
    match status {
        BackendStatus::HardTerminating => kill_due().then_some(Action::Signal {
            container_id,
            signal: Signal::Kill,
        }),
        BackendStatus::Terminating if kind == TerminationKind::Hard => {
            Some(Action::BeginHardTermination {
                container_id,
                reason,
            })
        }
        BackendStatus::Terminating => {
            let deadline = row.kill_deadline.unwrap_or(Millis::MIN);
            if now >= deadline {
                kill_due().then_some(Action::Signal {
                    container_id,
                    signal: Signal::Kill,
                })
            } else if row.last_signal.is_none() {
                Some(Action::Signal {
                    container_id,
                    signal: Signal::Term,
                })
            } else {
                None
            }
        }
        _ => Some(match kind {
            TerminationKind::Soft => Action::BeginSoftTermination {
                container_id,
                reason,
            },
            TerminationKind::Hard => Action::BeginHardTermination {
                container_id,
                reason,
            },
        }),
    }
}

/// The earliest instant at which [`plan_backend`] may answer differently for
/// this row without anything else changing: a startup deadline, a kill
/// deadline, or a SIGKILL retry.
pub fn next_deadline(row: &BackendRow) -> Option<Millis> {
    match row.status() {
        BackendStatus::Waiting => row.startup_deadline,
        BackendStatus::Terminating => match row.last_signal {
            Some((Signal::Kill, at)) => Some(at.saturating_add(KILL_RETRY_MS)),
            _ => row.kill_deadline,
        },
        BackendStatus::HardTerminating => row.last_signal.map(|(_, at)| at.saturating_add(KILL_RETRY_MS)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendName, BackendState, EventSource, ExecutorSpec};

    const NOW: Millis = 1_000_000;

    fn row(desired: Desired, state: BackendState) -> BackendRow {
        let requested = (desired == Desired::Terminated)
            .then_some((TerminationKind::Soft, TerminationReason::External));
        BackendRow {
            id: BackendName::parse("ba-test").unwrap(),
            spec: ExecutorSpec::from_json(serde_json::json!({"image": "busybox"})).unwrap(),
            desired,
            requested_termination: requested,
            state,
            container_id: None,
            exit_code: None,
            oom_killed: None,
            error: None,
            startup_deadline: Some(NOW + 1_000),
            kill_deadline: Some(NOW + 1_000),
            last_signal: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn container(run_state: RunState) -> ObservedContainer {
        ObservedContainer {
            container_id: "c1".into(),
            backend: BackendName::parse("ba-test").unwrap(),
            run_state,
            host_port: Some(4000),
            exit: None,
        }
    }

    fn exit(code: i32) -> ObservedExit {
        ObservedExit {
            exit_code: Some(code),
            finished_at: NOW - 10,
            oom_killed: false,
            source: EventSource::DockerEvent,
        }
    }

    fn waiting() -> BackendState {
        BackendState::Waiting {
            address: "127.0.0.1:4000".into(),
        }
    }

    fn ready() -> BackendState {
        BackendState::Ready {
            address: Some("127.0.0.1:4000".into()),
        }
    }

    fn terminating() -> BackendState {
        ready().to_terminating(TerminationReason::External)
    }

    fn hard_terminating() -> BackendState {
        ready().to_hard_terminating(TerminationReason::External)
    }

    fn check(
        desired: Desired,
        state: BackendState,
        run_state: Option<RunState>,
        expected: Option<Action>,
    ) {
        let row = row(desired, state.clone());
        let observed = run_state.map(container);
        let actual = plan_backend(&row, observed.as_ref(), None, NOW);
        assert_eq!(
            actual, expected,
            "desired {desired:?}, state {state:?}, container {run_state:?}"
        );
    }

    fn kill() -> Option<Action> {
        Some(Action::Signal {
            container_id: "c1".into(),
            signal: Signal::Kill,
        })
    }

    /// Every (desired, status, observed) combination has one expected action.
    #[test]
    fn every_desired_and_observed_pair_has_an_action() {
        use Desired::{Running as Run, Terminated as Term};
        let c1 = || "c1".to_string();
        let exited = Some(Action::RecordExit {
            container_id: c1(),
            exit: None,
        });
        let gone = Some(Action::RecordGone { exit: None });
        let unstarted = Some(Action::RecordTerminatedUnstarted);
        let remove = Some(Action::RemoveUnstarted { container_id: c1() });
        let soft = Some(Action::BeginSoftTermination {
            container_id: c1(),
            reason: TerminationReason::External,
        });
        let probe = Some(Action::Probe {
            container_id: c1(),
            address: "127.0.0.1:4000".into(),
            deadline: NOW + 1_000,
        });
        let start = Some(Action::StartContainer { container_id: c1() });
        let adopt = Some(Action::AdoptRunning {
            container_id: c1(),
            host_port: Some(4000),
        });
        let prepare = Some(Action::PrepareImage);
        let create = Some(Action::CreateContainer);
        let none: Option<RunState> = None;
        let created = Some(RunState::Created);
        let running = Some(RunState::Running);
        let stopped = Some(RunState::Exited);
        use BackendState as B;

        let table: Vec<(Desired, BackendState, Option<RunState>, Option<Action>)> = vec![
            // Desired running, no container yet: walk the lifecycle.
            (Run, B::Scheduled, none, prepare.clone()),
            (Run, B::Loading, none, prepare.clone()),
            (Run, B::Starting, none, create.clone()),
            (Run, waiting(), none, gone.clone()),
            (Run, ready(), none, gone.clone()),
            // Desired running, created but not started (crash between create and start).
            (Run, B::Scheduled, created, prepare.clone()),
            (Run, B::Loading, created, prepare.clone()),
            (Run, B::Starting, created, start.clone()),
            (Run, waiting(), created, start.clone()),
            (Run, ready(), created, start.clone()),
            // Desired running, container running.
            (Run, B::Scheduled, running, prepare.clone()),
            (Run, B::Loading, running, prepare.clone()),
            (Run, B::Starting, running, adopt.clone()),
            (Run, waiting(), running, probe.clone()),
            (Run, ready(), running, None),
            // Desired running, container exited by itself.
            (Run, B::Scheduled, stopped, exited.clone()),
            (Run, B::Loading, stopped, exited.clone()),
            (Run, B::Starting, stopped, exited.clone()),
            (Run, waiting(), stopped, exited.clone()),
            (Run, ready(), stopped, exited.clone()),
            // Desired terminated before any container ran.
            (Term, B::Scheduled, none, unstarted.clone()),
            (Term, B::Loading, none, unstarted.clone()),
            (Term, B::Starting, none, unstarted.clone()),
            (Term, B::Starting, created, remove.clone()),
            (Term, waiting(), created, remove.clone()),
            // Desired terminated, container running: begin a soft termination.
            (Term, B::Starting, running, soft.clone()),
            (Term, waiting(), running, soft.clone()),
            (Term, ready(), running, soft.clone()),
            // Terminating inside its grace, SIGTERM not known sent: send it.
            (
                Term,
                terminating(),
                running,
                Some(Action::Signal {
                    container_id: c1(),
                    signal: Signal::Term,
                }),
            ),
            (Term, hard_terminating(), running, kill()),
            // Desired terminated, container gone or stopped.
            (Term, waiting(), none, gone.clone()),
            (Term, ready(), none, gone.clone()),
            (Term, terminating(), none, gone.clone()),
            (Term, hard_terminating(), none, gone.clone()),
            (Term, ready(), stopped, exited.clone()),
            (Term, terminating(), stopped, exited.clone()),
            (Term, hard_terminating(), stopped, exited.clone()),
        ];
        for (desired, state, run_state, expected) in table {
            check(desired, state, run_state, expected);
        }
        // Terminated is final, whatever Docker shows.
        for desired in [Run, Term] {
            for run_state in [none, created, running, stopped] {
                check(desired, ready().to_terminated(None, Some(0)), run_state, None);
            }
        }
    }

    #[test]
    fn startup_timeout_hard_terminates() {
        let mut late = row(Desired::Running, waiting());
        late.startup_deadline = Some(NOW);
        assert_eq!(
            plan_backend(&late, Some(&container(RunState::Running)), None, NOW),
            Some(Action::BeginHardTermination {
                container_id: "c1".into(),
                reason: TerminationReason::StartupTimeout
            })
        );
        assert_eq!(next_deadline(&late), Some(NOW));
    }

    #[test]
    fn soft_termination_escalates_to_kill_at_its_deadline() {
        let mut row = row(Desired::Terminated, terminating());
        row.last_signal = Some((Signal::Term, NOW - 500));
        let running = container(RunState::Running);
        assert_eq!(plan_backend(&row, Some(&running), None, NOW), None);
        assert_eq!(next_deadline(&row), Some(NOW + 1_000));
        assert_eq!(plan_backend(&row, Some(&running), None, NOW + 1_000), kill());
        // Once killed, not again until the retry interval has passed.
        row.last_signal = Some((Signal::Kill, NOW + 1_000));
        assert_eq!(plan_backend(&row, Some(&running), None, NOW + 1_001), None);
        assert_eq!(next_deadline(&row), Some(NOW + 1_000 + KILL_RETRY_MS));
        assert_eq!(
            plan_backend(&row, Some(&running), None, NOW + 1_000 + KILL_RETRY_MS),
            kill()
        );
    }

    #[test]
    fn hard_request_overrides_soft_termination_in_progress() {
        let mut row = row(Desired::Terminated, terminating());
        row.last_signal = Some((Signal::Term, NOW));
        row.requested_termination = Some((TerminationKind::Hard, TerminationReason::Swept));
        assert_eq!(
            plan_backend(&row, Some(&container(RunState::Running)), None, NOW),
            Some(Action::BeginHardTermination {
                container_id: "c1".into(),
                reason: TerminationReason::Swept
            })
        );
    }

    #[test]
    fn hard_request_kills_at_once() {
        let mut row = row(Desired::Terminated, ready());
        row.requested_termination = Some((TerminationKind::Hard, TerminationReason::External));
        assert_eq!(
            plan_backend(&row, Some(&container(RunState::Running)), None, NOW),
            Some(Action::BeginHardTermination {
                container_id: "c1".into(),
                reason: TerminationReason::External
            })
        );
    }

    #[test]
    fn vanished_container_uses_remembered_exit() {
        let row = row(Desired::Running, ready());
        assert_eq!(
            plan_backend(&row, None, Some(exit(137)), NOW),
            Some(Action::RecordGone {
                exit: Some(exit(137))
            })
        );
    }

    #[test]
    fn known_exit_is_passed_on() {
        let row = row(Desired::Running, ready());
        let mut stopped = container(RunState::Exited);
        stopped.exit = Some(exit(3));
        assert_eq!(
            plan_backend(&row, Some(&stopped), None, NOW),
            Some(Action::RecordExit {
                container_id: "c1".into(),
                exit: Some(exit(3))
            })
        );
    }

    /// After the action's effect is applied, planning again yields nothing.
    #[test]
    fn planning_after_applying_is_quiet() {
        let mut ready_row = row(Desired::Running, ready());
        let running = container(RunState::Running);
        assert_eq!(plan_backend(&ready_row, Some(&running), None, NOW), None);
        // A soft termination begun: terminating, SIGTERM sent, deadline ahead.
        ready_row.desired = Desired::Terminated;
        ready_row.requested_termination =
            Some((TerminationKind::Soft, TerminationReason::External));
        ready_row.state = terminating();
        ready_row.last_signal = Some((Signal::Term, NOW));
        assert_eq!(plan_backend(&ready_row, Some(&running), None, NOW), None);
        // Exit recorded.
        ready_row.state = terminating().to_terminated(None, Some(143));
        let stopped = container(RunState::Exited);
        assert_eq!(plan_backend(&ready_row, Some(&stopped), None, NOW), None);
    }

    #[test]
    fn plan_covers_many_backends() {
        let mut observed = Observed::default();
        let rows: Vec<BackendRow> = (0..3)
            .map(|i| {
                let mut r = row(Desired::Running, ready());
                r.id = BackendName::parse(&format!("ba-{i}")).unwrap();
                r
            })
            .collect();
        let mut c = container(RunState::Running);
        c.backend = rows[0].id.clone();
        observed.containers.insert(rows[0].id.clone(), c);
        let actions = plan(&rows, &observed, NOW);
        assert_eq!(actions.len(), 2, "{actions:?}");
        assert!(actions.iter().all(|(_, a)| matches!(a, Action::RecordGone { exit: None })));
    }
}
