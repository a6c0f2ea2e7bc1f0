//! Property tests (a short fuzz run in every `cargo test`) of the two pure
//! functions that hostile input reaches first: the spawn-body parser and the
//! planner.
//!
//! The parser never panics, and it either accepts a spec that survives its
//! own round trip or refuses with an error naming a field under `executable`
//! (or the body's `id`). The planner never panics, answers the same twice,
//! never acts on a terminated backend, never starts what is to be terminated,
//! and never leaves a backend idle with a deadline already behind it (which
//! would spin the reconcile loop).

use drover::api::{parse_spawn, ApiError};
use drover::config::Config;
use drover::model::{
    BackendName, BackendRow, BackendState, BackendStatus, Desired, EventSource, ExecutorSpec,
    Millis, ObservedContainer, ObservedExit, RunState, Signal, TerminationKind, TerminationReason,
};
use drover::planner::{self, Action, Observed};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Enough cases to shake out the edges, few enough for every CI run.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// --- the spawn-body parser ----------------------------------------------------

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Image references near the grammar's edges: valid ones and near misses.
fn image() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("busybox")),
        Just(json!("drover-test/busybox:latest")),
        Just(json!("localhost:5000/a/b:v1.2")),
        Just(json!("ghcr.io/Org/app")),
        Just(json!("busybox@sha256:0123456789abcdef0123456789abcdef")),
        "[a-z0-9._/:@-]{0,24}".prop_map(Value::String),
        "[A-Za-z0-9 ._/:@\\-\u{0}\u{e9}]{0,24}".prop_map(Value::String),
        any_json(),
    ]
}

/// Limits from every range: negative, zero, tiny, Docker-sized, huge.
fn limit() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(|n| json!(n)),
        (-10i64..2_000_000).prop_map(|n| json!(n)),
        Just(json!(i64::MAX)),
        Just(json!(u64::MAX)),
        Just(json!("100")),
        Just(json!(1.5)),
    ]
}

fn executable() -> impl Strategy<Value = Value> {
    let env = prop::collection::btree_map("[A-Z_=\u{0}]{0,6}", "[a-z\u{0}]{0,6}", 0..5);
    let limits = prop::collection::btree_map(
        prop_oneof![
            Just("cpu_period".to_string()),
            Just("cpu_period_percent".to_string()),
            Just("cpu_time_limit".to_string()),
            Just("memory_limit_bytes".to_string()),
            Just("disk_limit_bytes".to_string()),
            "[a-z]{1,6}".prop_map(String::from),
        ],
        limit(),
        0..4,
    );
    let mount = prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        "[a-z./\u{0}]{0,12}".prop_map(Value::String),
        any_json(),
    ];
    let optional = |s: BoxedStrategy<Value>| prop::option::of(s);
    (
        image(),
        optional(
            prop_oneof![
                Just(json!("IfNotPresent")),
                Just(json!("Always")),
                Just(json!("Never")),
                any_json()
            ]
            .boxed(),
        ),
        optional(
            prop_oneof![
                ("[a-z]{0,4}", "[a-z]{0,4}")
                    .prop_map(|(u, p)| json!({"username": u, "password": p})),
                any_json(),
            ]
            .boxed(),
        ),
        optional(env.prop_map(|m| json!(m)).boxed()),
        optional(limits.prop_map(|m| json!(m)).boxed()),
        optional(mount.boxed()),
        optional(prop_oneof!["[a-z:. -]{0,10}".prop_map(Value::String), any_json()].boxed()),
        optional(
            prop_oneof![
                prop::collection::vec("[a-z\u{0}]{0,5}", 0..4).prop_map(|v| json!(v)),
                any_json()
            ]
            .boxed(),
        ),
        optional(any_json().boxed()),
    )
        .prop_map(
            |(image, pull, credentials, env, limits, mount, network, command, stranger)| {
                let mut object = serde_json::Map::new();
                object.insert("image".into(), image);
                for (key, value) in [
                    ("pull_policy", pull),
                    ("credentials", credentials),
                    ("env", env),
                    ("resource_limits", limits),
                    ("mount", mount),
                    ("network_name", network),
                    ("command", command),
                    ("stranger", stranger),
                ] {
                    if let Some(value) = value {
                        object.insert(key.into(), value);
                    }
                }
                Value::Object(object)
            },
        )
}

/// Executables that are valid by construction, from every corner of the ranges.
fn valid_executable() -> impl Strategy<Value = Value> {
    let image = prop_oneof![
        "[a-z0-9]{1,8}(/[a-z0-9]{1,6}([._-][a-z0-9]{1,4})?){0,2}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,10})?",
        "(localhost|127\\.0\\.0\\.1|[a-z]{1,6}\\.io)(:[0-9]{2,5})?/[a-z0-9]{1,8}(:[a-z0-9]{1,6})?",
        "[a-z]{1,8}@sha256:[0-9a-f]{64}",
    ];
    let env = prop::collection::btree_map("[A-Za-z_][A-Za-z0-9_]{0,8}", "[ -~]{0,16}", 0..20);
    let limits = (
        prop::option::of(1_000i64..=1_000_000),
        prop::option::of(1i64..=100_000),
        prop::option::of(1i64..=i64::MAX),
        prop::option::of(6 * 1024 * 1024i64..=i64::MAX),
        prop::option::of(1i64..=i64::MAX),
    )
        .prop_map(|(period, percent, cpu_time, memory, disk)| {
            // A quota under 1 ms is refused; raise the percent to reach it.
            let percent = percent.map(|p| p.max((100_000 / period.unwrap_or(100_000)).max(1) + 1));
            let mut object = serde_json::Map::new();
            for (key, value) in [
                ("cpu_period", period),
                ("cpu_period_percent", percent),
                ("cpu_time_limit", cpu_time),
                ("memory_limit_bytes", memory),
                ("disk_limit_bytes", disk),
            ] {
                if let Some(value) = value {
                    object.insert(key.into(), json!(value));
                }
            }
            Value::Object(object)
        });
    (
        image,
        prop::option::of(prop::sample::select(vec![
            "IfNotPresent",
            "Always",
            "Never",
        ])),
        prop::option::of(("[a-z]{1,6}", "[ -~]{0,12}")),
        env,
        limits,
        prop::option::of(prop_oneof![
            Just(json!(false)),
            "[a-z0-9]{1,5}(/[a-z0-9][a-z0-9._-]{0,4}){0,2}".prop_map(Value::String),
        ]),
        prop::option::of(
            "[a-z0-9][a-z0-9_.-]{0,10}"
                .prop_filter("not host or none", |n| n != "host" && n != "none"),
        ),
        prop::option::of(prop::collection::vec("[ -~]{0,8}", 1..4)),
    )
        .prop_map(
            |(image, pull, credentials, env, limits, mount, network, command)| {
                let mut executable =
                    json!({ "image": image, "env": env, "resource_limits": limits });
                if let Some(pull) = pull {
                    executable["pull_policy"] = json!(pull);
                }
                if let Some((username, password)) = credentials {
                    executable["credentials"] =
                        json!({ "username": username, "password": password });
                }
                if let Some(mount) = mount {
                    executable["mount"] = mount;
                }
                if let Some(network) = network {
                    executable["network_name"] = json!(network);
                }
                if let Some(command) = command {
                    executable["command"] = json!(command);
                }
                executable
            },
        )
}

/// What must hold of any spec the parser accepted.
fn check_accepted(spec: &ExecutorSpec) -> Result<(), TestCaseError> {
    prop_assert_eq!(spec.validate(), Ok(()));
    // The stored form reads back as the same spec.
    let stored = serde_json::to_value(spec).unwrap();
    prop_assert_eq!(&ExecutorSpec::from_json(stored).unwrap(), spec);
    if let Some(quota) = spec.resource_limits.cpu_quota() {
        prop_assert!(quota >= 1_000, "quota {quota} below the kernel's minimum");
    }
    if spec.credentials.is_some() {
        let shown = serde_json::to_string(&spec.redacted()).unwrap();
        prop_assert!(shown.contains("<redacted>"));
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_spec_parser_accepts_or_names_a_field_under_executable(value in prop_oneof![executable(), any_json()]) {
        match ExecutorSpec::from_json(value) {
            Ok(spec) => check_accepted(&spec)?,
            Err(e) => {
                prop_assert!(
                    e.field == "executable" || e.field.starts_with("executable.") || e.field.starts_with("executable["),
                    "field {:?} is not under executable ({})", e.field, e
                );
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn the_spec_parser_accepts_every_valid_executable(value in valid_executable()) {
        match ExecutorSpec::from_json(value.clone()) {
            Ok(spec) => check_accepted(&spec)?,
            Err(e) => prop_assert!(false, "refused a valid executable {value}: {e}"),
        }
    }

    #[test]
    fn the_spawn_body_parser_never_panics_on_any_bytes(body in prop::collection::vec(any::<u8>(), 0..256)) {
        match parse_spawn(&body, &Config::default()) {
            Ok(request) => check_accepted(&request.spec)?,
            Err(ApiError::BadRequest(message)) => prop_assert!(!message.is_empty()),
            Err(other) => prop_assert!(false, "unexpected error kind: {other:?}"),
        }
    }

    #[test]
    fn the_spawn_body_parser_refuses_with_a_400_naming_where(
        id in prop::option::of(prop_oneof!["ba-[a-z0-9-]{0,50}".prop_map(Value::String), ".{0,8}".prop_map(Value::String), any_json()]),
        executable in prop_oneof![executable(), any_json()],
    ) {
        let mount_base = tempfile::tempdir().unwrap();
        let config = Config {
            docker: drover::config::DockerConfig {
                mount_base: Some(mount_base.path().join("mounts")),
                ..Default::default()
            },
            ..Config::default()
        };
        let mut body = json!({ "executable": executable });
        if let Some(id) = id {
            body["id"] = id;
        }
        match parse_spawn(body.to_string().as_bytes(), &config) {
            Ok(request) => check_accepted(&request.spec)?,
            Err(ApiError::BadRequest(message)) => prop_assert!(
                message.starts_with("executable") || message.starts_with("id: "),
                "error names no field: {message}"
            ),
            Err(other) => prop_assert!(false, "unexpected error kind: {other:?}"),
        }
        // Checking a mount path never creates anything.
        prop_assert!(!mount_base.path().join("mounts").exists());
    }
}

// --- the planner ------------------------------------------------------------

const NOW: Millis = 1_000_000_000;

fn millis_near_now() -> impl Strategy<Value = Millis> {
    prop_oneof![
        NOW - 100_000..NOW + 100_000,
        Just(NOW),
        Just(0),
        Just(Millis::MAX)
    ]
}

fn status() -> impl Strategy<Value = BackendStatus> {
    prop::sample::select(BackendStatus::ALL.to_vec())
}

fn reason() -> impl Strategy<Value = TerminationReason> {
    prop::sample::select(vec![
        TerminationReason::Swept,
        TerminationReason::External,
        TerminationReason::KeyExpired,
        TerminationReason::Lost,
        TerminationReason::StartupTimeout,
        TerminationReason::InternalError,
    ])
}

fn kind() -> impl Strategy<Value = TerminationKind> {
    prop_oneof![Just(TerminationKind::Soft), Just(TerminationKind::Hard)]
}

fn state() -> impl Strategy<Value = BackendState> {
    (
        status(),
        status(),
        kind(),
        reason(),
        prop::option::of(any::<i32>()),
    )
        .prop_map(|(status, last, kind, reason, exit_code)| {
            let address = "127.0.0.1:4000".to_string();
            match status {
                BackendStatus::Scheduled => BackendState::Scheduled,
                BackendStatus::Loading => BackendState::Loading,
                BackendStatus::Starting => BackendState::Starting,
                BackendStatus::Waiting => BackendState::Waiting { address },
                BackendStatus::Ready => BackendState::Ready {
                    address: Some(address),
                },
                BackendStatus::Terminating => BackendState::Terminating {
                    last_status: last,
                    termination: kind,
                    reason,
                },
                BackendStatus::HardTerminating => BackendState::HardTerminating {
                    last_status: last,
                    reason,
                },
                BackendStatus::Terminated => BackendState::Terminated {
                    last_status: last,
                    termination: Some(kind),
                    reason: Some(reason),
                    exit_code,
                },
            }
        })
}

fn exit() -> impl Strategy<Value = ObservedExit> {
    (
        prop::option::of(any::<i32>()),
        millis_near_now(),
        any::<bool>(),
    )
        .prop_map(|(exit_code, finished_at, oom_killed)| ObservedExit {
            exit_code,
            finished_at,
            oom_killed,
            source: EventSource::DockerEvent,
        })
}

fn row() -> impl Strategy<Value = BackendRow> {
    (
        any::<bool>(),
        prop::option::of((kind(), reason())),
        state(),
        prop::option::of(millis_near_now()),
        prop::option::of(millis_near_now()),
        // Signals are stamped with the wall clock, so their times are near now.
        prop::option::of((
            prop_oneof![Just(Signal::Term), Just(Signal::Kill)],
            NOW - 100_000..NOW + 100_000,
        )),
    )
        .prop_map(
            |(running, requested, state, startup_deadline, kill_deadline, last_signal)| {
                let desired = if running {
                    Desired::Running
                } else {
                    Desired::Terminated
                };
                let mut row = BackendRow {
                    id: BackendName::parse("ba-prop").unwrap(),
                    spec: ExecutorSpec::from_json(json!({"image": "busybox"})).unwrap(),
                    desired,
                    requested_termination: if desired == Desired::Terminated {
                        requested
                    } else {
                        None
                    },
                    state,
                    container_id: None,
                    exit_code: None,
                    oom_killed: None,
                    error: None,
                    startup_deadline,
                    kill_deadline,
                    last_signal,
                    created_at: 0,
                    updated_at: 0,
                };
                // Reachable rows only: a soft termination sends SIGKILL once its
                // kill deadline has passed, never before.
                if let (BackendStatus::Terminating, Some((Signal::Kill, at))) =
                    (row.status(), row.last_signal)
                {
                    row.kill_deadline = Some(row.kill_deadline.map_or(at, |d| d.min(at)));
                }
                row
            },
        )
}

fn container() -> impl Strategy<Value = Option<ObservedContainer>> {
    prop::option::of(
        (
            prop_oneof![
                Just(RunState::Created),
                Just(RunState::Running),
                Just(RunState::Exited)
            ],
            prop::option::of(1u16..),
            prop::option::of(exit()),
        )
            .prop_map(|(run_state, host_port, exit)| ObservedContainer {
                container_id: "c1".into(),
                backend: BackendName::parse("ba-prop").unwrap(),
                run_state,
                host_port,
                exit,
            }),
    )
}

fn starts_something(action: &Action) -> bool {
    matches!(
        action,
        Action::PrepareImage
            | Action::CreateContainer
            | Action::StartContainer { .. }
            | Action::AdoptRunning { .. }
            | Action::Probe { .. }
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_planner_is_total_deterministic_and_safe(
        row in row(),
        container in container(),
        remembered in prop::option::of(exit()),
        now in millis_near_now(),
    ) {
        let first = planner::plan_backend(&row, container.as_ref(), remembered, now);
        let second = planner::plan_backend(&row, container.as_ref(), remembered, now);
        prop_assert_eq!(&first, &second, "planning twice answers differently");

        // `plan` over many rows gives each row what `plan_backend` gives it.
        let mut observed = Observed::default();
        if let Some(c) = &container {
            observed.containers.insert(row.id.clone(), c.clone());
        }
        if let Some(exit) = remembered {
            observed.remembered_exits.insert(row.id.clone(), exit);
        }
        let all = planner::plan([&row], &observed, now);
        prop_assert_eq!(all.first().map(|(_, a)| a.clone()), first.clone());

        if row.status() == BackendStatus::Terminated {
            prop_assert_eq!(first.clone(), None, "a terminated backend is left alone");
        }
        let terminating = row.desired == Desired::Terminated
            || matches!(row.status(), BackendStatus::Terminating | BackendStatus::HardTerminating);
        if let Some(action) = &first {
            if terminating {
                prop_assert!(!starts_something(action), "starts {action:?} for a backend to terminate");
            }
            if !terminating {
                if let Action::BeginHardTermination { reason, .. } = action {
                    prop_assert_eq!(*reason, TerminationReason::StartupTimeout, "killed a wanted backend");
                }
                prop_assert!(!matches!(action, Action::BeginSoftTermination { .. }), "soft-terminated a wanted backend");
            }
        }
        // Idle with a deadline behind it would spin the loop: nothing would change.
        if first.is_none() {
            if let Some(deadline) = planner::next_deadline(&row) {
                prop_assert!(deadline > now, "idle with a past deadline {deadline} (now {now})");
            }
        }
    }

    #[test]
    fn an_idle_backend_stays_idle_until_its_next_deadline(
        row in row(),
        container in container(),
        now in millis_near_now(),
        step in 0i64..200_000,
    ) {
        if planner::plan_backend(&row, container.as_ref(), None, now).is_some() {
            // Not idle: the other property covers it.
            return Ok(());
        }
        let later = now.saturating_add(step);
        match planner::next_deadline(&row) {
            Some(deadline) if later >= deadline => {}
            _ => prop_assert_eq!(
                planner::plan_backend(&row, container.as_ref(), None, later),
                None,
                "woke at {} with no deadline before it", later
            ),
        }
    }
}
