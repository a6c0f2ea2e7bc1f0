//! Domain types shared by every layer: backend names, Plane-compatible backend
//! states, and the spawn spec (Plane's `DockerExecutorConfig`) parsed and
//! validated at the edge.
//!
//! Everything here is plain data with serde: no I/O, no Docker, no SQL. A value
//! of these types has already been validated, so the core never re-checks it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Longest backend name Plane accepts (`ba-` included).
pub const MAX_BACKEND_NAME_LEN: usize = 45;

/// Label Plane puts on every backend container; drover keeps it for compatibility.
pub const LABEL_PLANE_BACKEND: &str = "dev.plane.backend";
/// Label naming the drover instance (one per database) that owns a container.
pub const LABEL_INSTANCE: &str = "dev.drover.instance";
/// Label carrying the backend name, so a container maps back to its row without parsing names.
pub const LABEL_BACKEND_NAME: &str = "dev.drover.backend";

/// The port a backend listens on inside its container (`PORT` env var).
pub const CONTAINER_PORT: u16 = 8080;

/// A validated backend name: `ba-` then lowercase letters, digits and dashes,
/// at most [`MAX_BACKEND_NAME_LEN`] characters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct BackendName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("backend id must start with \"ba-\"")]
    MissingPrefix,
    #[error("backend id is longer than {MAX_BACKEND_NAME_LEN} characters")]
    TooLong,
    #[error("backend id has nothing after \"ba-\"")]
    Empty,
    #[error("backend id may only contain lowercase letters, digits and '-' (found {0:?})")]
    InvalidCharacter(char),
}

impl BackendName {
    pub fn parse(raw: &str) -> Result<Self, NameError> {
        let rest = raw.strip_prefix("ba-").ok_or(NameError::MissingPrefix)?;
        if raw.len() > MAX_BACKEND_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if rest.is_empty() {
            return Err(NameError::Empty);
        }
        if let Some(bad) = rest
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(NameError::InvalidCharacter(bad));
        }
        Ok(Self(raw.to_string()))
    }

    /// A fresh random name, `ba-` and 14 lowercase letters and digits, as Plane makes them.
    pub fn new_random() -> Self {
        use rand::Rng;
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::thread_rng();
        let suffix: String = (0..14)
            .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
            .collect();
        Self(format!("ba-{suffix}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The Docker container name for this backend, as Plane names it.
    pub fn container_name(&self) -> String {
        format!("plane-{}", self.0)
    }
}

impl fmt::Display for BackendName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for BackendName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        BackendName::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// Where a backend is in its life, as Plane's `BackendStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendStatus {
    Scheduled,
    Loading,
    Starting,
    Waiting,
    Ready,
    Terminating,
    HardTerminating,
    Terminated,
}

impl BackendStatus {
    pub const ALL: [BackendStatus; 8] = [
        BackendStatus::Scheduled,
        BackendStatus::Loading,
        BackendStatus::Starting,
        BackendStatus::Waiting,
        BackendStatus::Ready,
        BackendStatus::Terminating,
        BackendStatus::HardTerminating,
        BackendStatus::Terminated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendStatus::Scheduled => "scheduled",
            BackendStatus::Loading => "loading",
            BackendStatus::Starting => "starting",
            BackendStatus::Waiting => "waiting",
            BackendStatus::Ready => "ready",
            BackendStatus::Terminating => "terminating",
            BackendStatus::HardTerminating => "hard-terminating",
            BackendStatus::Terminated => "terminated",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    pub fn is_terminal(self) -> bool {
        self == BackendStatus::Terminated
    }
}

impl fmt::Display for BackendStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TerminationKind {
    Soft,
    Hard,
}

impl TerminationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TerminationKind::Soft => "soft",
            TerminationKind::Hard => "hard",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "soft" => Some(TerminationKind::Soft),
            "hard" => Some(TerminationKind::Hard),
            _ => None,
        }
    }
}

/// Why a backend was terminated, as Plane's `TerminationReason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TerminationReason {
    Swept,
    External,
    KeyExpired,
    Lost,
    StartupTimeout,
    InternalError,
}

impl TerminationReason {
    pub fn as_str(self) -> &'static str {
        match self {
            TerminationReason::Swept => "swept",
            TerminationReason::External => "external",
            TerminationReason::KeyExpired => "keyexpired",
            TerminationReason::Lost => "lost",
            TerminationReason::StartupTimeout => "startuptimeout",
            TerminationReason::InternalError => "internalerror",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(raw.to_string())).ok()
    }
}

/// A backend's state, serialized exactly as Plane's `BackendState`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum BackendState {
    Scheduled,
    Loading,
    Starting,
    Waiting {
        address: String,
    },
    Ready {
        address: Option<String>,
    },
    Terminating {
        last_status: BackendStatus,
        termination: TerminationKind,
        reason: TerminationReason,
    },
    HardTerminating {
        last_status: BackendStatus,
        reason: TerminationReason,
    },
    Terminated {
        last_status: BackendStatus,
        termination: Option<TerminationKind>,
        reason: Option<TerminationReason>,
        exit_code: Option<i32>,
    },
}

impl BackendState {
    pub fn status(&self) -> BackendStatus {
        match self {
            BackendState::Scheduled => BackendStatus::Scheduled,
            BackendState::Loading => BackendStatus::Loading,
            BackendState::Starting => BackendStatus::Starting,
            BackendState::Waiting { .. } => BackendStatus::Waiting,
            BackendState::Ready { .. } => BackendStatus::Ready,
            BackendState::Terminating { .. } => BackendStatus::Terminating,
            BackendState::HardTerminating { .. } => BackendStatus::HardTerminating,
            BackendState::Terminated { .. } => BackendStatus::Terminated,
        }
    }

    pub fn address(&self) -> Option<&str> {
        match self {
            BackendState::Waiting { address } => Some(address),
            BackendState::Ready { address } => address.as_deref(),
            _ => None,
        }
    }

    /// The status this state carries as "where it came from": its own status,
    /// except for terminating states, which remember the one before them.
    fn last_live_status(&self) -> BackendStatus {
        match self {
            BackendState::Terminating { last_status, .. }
            | BackendState::HardTerminating { last_status, .. }
            | BackendState::Terminated { last_status, .. } => *last_status,
            other => other.status(),
        }
    }

    pub fn to_terminating(&self, reason: TerminationReason) -> BackendState {
        BackendState::Terminating {
            last_status: self.last_live_status(),
            termination: TerminationKind::Soft,
            reason,
        }
    }

    pub fn to_hard_terminating(&self, reason: TerminationReason) -> BackendState {
        BackendState::HardTerminating {
            last_status: self.last_live_status(),
            reason,
        }
    }

    /// The terminated state reached from this one. A termination in progress
    /// keeps its kind and reason; `requested` fills them in where the backend
    /// ended before the termination began (e.g. terminated while loading).
    pub fn to_terminated(
        &self,
        requested: Option<(TerminationKind, TerminationReason)>,
        exit_code: Option<i32>,
    ) -> BackendState {
        let (termination, reason) = match self {
            BackendState::Terminating {
                termination,
                reason,
                ..
            } => (Some(*termination), Some(*reason)),
            BackendState::HardTerminating { reason, .. } => {
                (Some(TerminationKind::Hard), Some(*reason))
            }
            _ => match requested {
                Some((kind, reason)) => (Some(kind), Some(reason)),
                None => (None, None),
            },
        };
        BackendState::Terminated {
            last_status: self.last_live_status(),
            termination,
            reason,
            exit_code,
        }
    }
}

/// Whether a backend should be running. Written by users; the reconciler
/// moves the observed world towards it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Terminated,
}

impl Desired {
    pub fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Terminated => "terminated",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    #[default]
    IfNotPresent,
    Always,
    Never,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceLimits {
    /// CPU scheduling period, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_period: Option<i64>,
    /// Share of each period the backend may use, in percent of one core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_period_percent: Option<i64>,
    /// Total CPU time the process may consume, in seconds (the `cpu` ulimit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_time_limit: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_limit_bytes: Option<i64>,
}

/// Plane's `mount` field: `true` (a folder named after the key), `false`, or a
/// relative path under the configured mount base.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MountSpec {
    Flag(bool),
    Path(PathBuf),
}

/// What to run for one backend: Plane's `DockerExecutorConfig`, plus `command`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorSpec {
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<RegistryCredentials>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resource_limits: ResourceLimits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<MountSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_name: Option<String>,
    /// The container's argv; the image's default command when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
}

/// A spawn request that failed validation: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl ExecutorSpec {
    /// Parses and validates a spawn spec from JSON. The error names the field.
    pub fn from_json(value: serde_json::Value) -> Result<Self, SpecError> {
        let spec: ExecutorSpec = serde_json::from_value(value)
            .map_err(|e| SpecError::new("executable", e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn pull_policy(&self) -> PullPolicy {
        self.pull_policy.unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        validate_image(&self.image)?;
        for (key, value) in &self.env {
            if key.is_empty() {
                return Err(SpecError::new("executable.env", "empty variable name"));
            }
            if key.contains('=') || key.contains('\0') {
                return Err(SpecError::new(
                    format!("executable.env.{}", key.escape_debug()),
                    "variable name may not contain '=' or NUL",
                ));
            }
            if value.contains('\0') {
                return Err(SpecError::new(
                    format!("executable.env.{key}"),
                    "value may not contain NUL",
                ));
            }
        }
        let limits = &self.resource_limits;
        for (name, value) in [
            ("cpu_period", limits.cpu_period),
            ("cpu_period_percent", limits.cpu_period_percent),
            ("cpu_time_limit", limits.cpu_time_limit),
            ("memory_limit_bytes", limits.memory_limit_bytes),
            ("disk_limit_bytes", limits.disk_limit_bytes),
        ] {
            if let Some(v) = value {
                if v <= 0 {
                    return Err(SpecError::new(
                        format!("executable.resource_limits.{name}"),
                        format!("must be positive, got {v}"),
                    ));
                }
            }
        }
        if let Some(MountSpec::Path(path)) = &self.mount {
            validate_mount_path(path)?;
        }
        if let Some(network) = &self.network_name {
            if network.is_empty() {
                return Err(SpecError::new("executable.network_name", "must not be empty"));
            }
        }
        if let Some(command) = &self.command {
            if command.is_empty() {
                return Err(SpecError::new("executable.command", "must not be an empty list"));
            }
            if command.iter().any(|arg| arg.contains('\0')) {
                return Err(SpecError::new("executable.command", "argument contains NUL"));
            }
        }
        Ok(())
    }

    /// The spec as shown to users: registry password replaced.
    pub fn redacted(&self) -> ExecutorSpec {
        let mut copy = self.clone();
        if let Some(credentials) = &mut copy.credentials {
            credentials.password = "<redacted>".to_string();
        }
        copy
    }
}

fn validate_image(image: &str) -> Result<(), SpecError> {
    let field = "executable.image";
    if image.trim().is_empty() {
        return Err(SpecError::new(field, "must not be empty"));
    }
    if let Some(bad) = image
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || !c.is_ascii())
    {
        return Err(SpecError::new(
            field,
            format!("invalid character {bad:?} in image reference"),
        ));
    }
    // The repository part (before any tag or digest) must be lowercase.
    let without_digest = image.split('@').next().unwrap_or(image);
    let repository = match without_digest.rfind(':') {
        Some(colon) if !without_digest[colon..].contains('/') => &without_digest[..colon],
        _ => without_digest,
    };
    let path = match repository.split_once('/') {
        // The first component is a registry host when it looks like one; hosts may be mixed case.
        Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            rest
        }
        _ => repository,
    };
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(SpecError::new(
            field,
            "repository name must be lowercase",
        ));
    }
    Ok(())
}

/// A mount path must stay under the mount base: relative, without `..`.
pub fn validate_mount_path(path: &Path) -> Result<(), SpecError> {
    let field = "executable.mount";
    if path.as_os_str().is_empty() {
        return Err(SpecError::new(field, "path must not be empty"));
    }
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(SpecError::new(field, "path may not contain '..'"));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(SpecError::new(field, "path must be relative to the mount base"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn backend_names_follow_plane_rules() {
        assert!(BackendName::parse("ba-abc123").is_ok());
        assert!(BackendName::parse("ba-a-b").is_ok());
        assert_eq!(BackendName::parse("abc"), Err(NameError::MissingPrefix));
        assert_eq!(BackendName::parse("ba-"), Err(NameError::Empty));
        assert_eq!(
            BackendName::parse("ba-ABC"),
            Err(NameError::InvalidCharacter('A'))
        );
        assert_eq!(
            BackendName::parse("ba-a b"),
            Err(NameError::InvalidCharacter(' '))
        );
        assert_eq!(
            BackendName::parse("ba-é"),
            Err(NameError::InvalidCharacter('é'))
        );
        let longest = format!("ba-{}", "a".repeat(42));
        assert!(BackendName::parse(&longest).is_ok());
        assert_eq!(
            BackendName::parse(&format!("{longest}a")),
            Err(NameError::TooLong)
        );
        let random = BackendName::new_random();
        assert_eq!(BackendName::parse(random.as_str()), Ok(random.clone()));
        assert_eq!(random.container_name(), format!("plane-{random}"));
    }

    #[test]
    fn states_serialize_like_plane() {
        assert_eq!(
            serde_json::to_value(BackendState::Scheduled).unwrap(),
            json!({"status": "scheduled"})
        );
        assert_eq!(
            serde_json::to_value(BackendState::Waiting {
                address: "127.0.0.1:1234".into()
            })
            .unwrap(),
            json!({"status": "waiting", "address": "127.0.0.1:1234"})
        );
        let ready = BackendState::Ready {
            address: Some("127.0.0.1:1234".into()),
        };
        let terminating = ready.to_terminating(TerminationReason::External);
        assert_eq!(
            serde_json::to_value(&terminating).unwrap(),
            json!({"status": "terminating", "last_status": "ready", "termination": "soft", "reason": "external"})
        );
        let hard = ready.to_hard_terminating(TerminationReason::StartupTimeout);
        assert_eq!(
            serde_json::to_value(&hard).unwrap(),
            json!({"status": "hard-terminating", "last_status": "ready", "reason": "startuptimeout"})
        );
        assert_eq!(
            serde_json::to_value(terminating.to_terminated(None, Some(137))).unwrap(),
            json!({"status": "terminated", "last_status": "ready", "termination": "soft", "reason": "external", "exit_code": 137})
        );
        assert_eq!(
            serde_json::to_value(hard.to_terminated(None, Some(137))).unwrap(),
            json!({"status": "terminated", "last_status": "ready", "termination": "hard", "reason": "startuptimeout", "exit_code": 137})
        );
        assert_eq!(
            serde_json::to_value(ready.to_terminated(None, Some(3))).unwrap(),
            json!({"status": "terminated", "last_status": "ready", "termination": null, "reason": null, "exit_code": 3})
        );
        let round: BackendState =
            serde_json::from_value(serde_json::to_value(&hard).unwrap()).unwrap();
        assert_eq!(round, hard);
    }

    #[test]
    fn reasons_use_plane_spelling() {
        for (reason, text) in [
            (TerminationReason::Swept, "swept"),
            (TerminationReason::External, "external"),
            (TerminationReason::KeyExpired, "keyexpired"),
            (TerminationReason::Lost, "lost"),
            (TerminationReason::StartupTimeout, "startuptimeout"),
            (TerminationReason::InternalError, "internalerror"),
        ] {
            assert_eq!(serde_json::to_value(reason).unwrap(), json!(text));
            assert_eq!(reason.as_str(), text);
            assert_eq!(TerminationReason::parse(text), Some(reason));
        }
        for status in BackendStatus::ALL {
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                json!(status.as_str())
            );
        }
    }

    #[test]
    fn spec_accepts_plane_executor_config() {
        let spec = ExecutorSpec::from_json(json!({
            "image": "ghcr.io/org/app:1.2",
            "pull_policy": "Always",
            "credentials": {"username": "u", "password": "p"},
            "env": {"A": "1"},
            "resource_limits": {"cpu_period": 100000, "cpu_period_percent": 50, "memory_limit_bytes": 1000000},
            "mount": "sessions/one",
            "network_name": "net",
            "command": ["sh", "-c", "true"]
        }))
        .unwrap();
        assert_eq!(spec.pull_policy(), PullPolicy::Always);
        assert_eq!(spec.redacted().credentials.unwrap().password, "<redacted>");
        let minimal = ExecutorSpec::from_json(json!({"image": "busybox"})).unwrap();
        assert_eq!(minimal.pull_policy(), PullPolicy::IfNotPresent);
        assert_eq!(minimal.mount, None);
        let flag = ExecutorSpec::from_json(json!({"image": "busybox", "mount": true})).unwrap();
        assert_eq!(flag.mount, Some(MountSpec::Flag(true)));
    }

    #[test]
    fn spec_errors_name_the_field() {
        let field = |value: serde_json::Value| ExecutorSpec::from_json(value).unwrap_err().field;
        assert_eq!(field(json!({"image": ""})), "executable.image");
        assert_eq!(field(json!({"image": "a b"})), "executable.image");
        assert_eq!(field(json!({"image": "Busybox"})), "executable.image");
        assert_eq!(
            ExecutorSpec::from_json(json!({"image": "localhost:5000/busybox:Latest"})).is_ok(),
            true
        );
        assert_eq!(
            field(json!({"image": "x", "resource_limits": {"memory_limit_bytes": -1}})),
            "executable.resource_limits.memory_limit_bytes"
        );
        assert_eq!(field(json!({"image": "x", "mount": "../etc"})), "executable.mount");
        assert_eq!(field(json!({"image": "x", "mount": "/etc"})), "executable.mount");
        assert_eq!(field(json!({"image": "x", "env": {"A=B": "1"}})), "executable.env.A=B");
        assert_eq!(field(json!({"image": "x", "command": []})), "executable.command");
        let err = ExecutorSpec::from_json(json!({"image": "x", "pull_policy": "Sometimes"})).unwrap_err();
        assert!(err.message.contains("Sometimes"), "{err}");
        let err = ExecutorSpec::from_json(json!({"image": "x", "colour": "red"})).unwrap_err();
        assert!(err.message.contains("colour"), "{err}");
    }
}

/// Milliseconds since the Unix epoch: the one time unit stored and planned with.
pub type Millis = i64;

pub fn now_millis() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

/// A signal drover sends to a backend's main process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Signal {
    #[serde(rename = "SIGTERM")]
    Term,
    #[serde(rename = "SIGKILL")]
    Kill,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Term => "SIGTERM",
            Signal::Kill => "SIGKILL",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "SIGTERM" => Some(Signal::Term),
            "SIGKILL" => Some(Signal::Kill),
            _ => None,
        }
    }
}

/// One backend as the store knows it: desired state and last recorded state.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendRow {
    pub id: BackendName,
    pub spec: ExecutorSpec,
    pub desired: Desired,
    /// The termination requested by a user (or by a startup timeout).
    pub requested_termination: Option<(TerminationKind, TerminationReason)>,
    pub state: BackendState,
    pub container_id: Option<String>,
    pub exit_code: Option<i32>,
    pub oom_killed: Option<bool>,
    pub error: Option<String>,
    pub startup_deadline: Option<Millis>,
    pub kill_deadline: Option<Millis>,
    pub last_signal: Option<(Signal, Millis)>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

impl BackendRow {
    pub fn status(&self) -> BackendStatus {
        self.state.status()
    }
}

/// How a container's run state looks to Docker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RunState {
    /// Created but never started.
    Created,
    /// Running, paused or restarting: its process exists.
    Running,
    /// Exited or dead: its process is gone, its exit code can be inspected.
    Exited,
}

/// Where knowledge of an exit came from; recorded with the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventSource {
    /// A user's request through the API or the runtime facade.
    Api,
    /// The reconciler's own action.
    Reconciler,
    /// Docker's event stream (`die` and its `exitCode`).
    DockerEvent,
    /// `docker inspect` of a stopped container, found by a resync.
    Inspect,
    /// The container vanished and no exit was seen.
    Missing,
}

impl EventSource {
    pub fn as_str(self) -> &'static str {
        match self {
            EventSource::Api => "api",
            EventSource::Reconciler => "reconciler",
            EventSource::DockerEvent => "docker-event",
            EventSource::Inspect => "inspect",
            EventSource::Missing => "missing",
        }
    }
}

/// An exit Docker told us about, by a `die` event or by inspect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObservedExit {
    pub exit_code: Option<i32>,
    pub finished_at: Millis,
    pub oom_killed: bool,
    pub source: EventSource,
}

/// One container of this instance as Docker reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedContainer {
    pub container_id: String,
    pub backend: BackendName,
    pub run_state: RunState,
    /// The host port published for the backend's port, when Docker listed one.
    pub host_port: Option<u16>,
    /// The exit, when already known (a `die` event was seen).
    pub exit: Option<ObservedExit>,
}
