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

impl ResourceLimits {
    /// The CFS quota in microseconds per period, from `cpu_period_percent`.
    /// Saturates rather than overflows (validation bounds both inputs).
    pub fn cpu_quota(&self) -> Option<i64> {
        let period = self.cpu_period.unwrap_or(DEFAULT_CPU_PERIOD);
        self.cpu_period_percent
            .map(|percent| period.saturating_mul(percent) / 100)
    }
}

/// Plane's `mount` field: `true` (a folder named after the key), `false`, or a
/// relative path under the configured mount base.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum MountSpec {
    Flag(bool),
    Path(PathBuf),
}

impl<'de> Deserialize<'de> for MountSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MountVisitor;
        impl serde::de::Visitor<'_> for MountVisitor {
            type Value = MountSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or a relative path")
            }
            fn visit_bool<E: serde::de::Error>(self, flag: bool) -> Result<MountSpec, E> {
                Ok(MountSpec::Flag(flag))
            }
            fn visit_str<E: serde::de::Error>(self, path: &str) -> Result<MountSpec, E> {
                Ok(MountSpec::Path(PathBuf::from(path)))
            }
        }
        deserializer.deserialize_any(MountVisitor)
    }
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

/// Most environment variables a spawn may set.
pub const MAX_ENV_VARS: usize = 1_000;
/// Most bytes the environment of a spawn may hold, names and values together.
pub const MAX_ENV_BYTES: usize = 64 * 1024;
/// Docker's smallest memory limit (6 MiB); a smaller one fails at create.
pub const MIN_MEMORY_LIMIT_BYTES: i64 = 6 * 1024 * 1024;
/// The kernel's bounds for a CFS period, in microseconds (1 ms to 1 s).
pub const CPU_PERIOD_RANGE: std::ops::RangeInclusive<i64> = 1_000..=1_000_000;
/// The kernel's smallest CFS quota, in microseconds.
pub const MIN_CPU_QUOTA: i64 = 1_000;
/// Highest `cpu_period_percent`: 1,000 cores' worth.
pub const MAX_CPU_PERIOD_PERCENT: i64 = 100_000;
/// Default CFS period (Docker's), in microseconds.
pub const DEFAULT_CPU_PERIOD: i64 = 100_000;

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
        refuse_sequences_as_objects(&value)?;
        let spec: ExecutorSpec = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = error_field_path(&e);
            let field = if path.is_empty() {
                "executable".to_string()
            } else {
                format!("executable.{path}")
            };
            SpecError::new(field, e.into_inner().to_string())
        })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn pull_policy(&self) -> PullPolicy {
        self.pull_policy.unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        validate_image(&self.image)?;
        if let Some(credentials) = &self.credentials {
            if credentials.username.is_empty() {
                return Err(SpecError::new(
                    "executable.credentials.username",
                    "must not be empty",
                ));
            }
        }
        if self.env.len() > MAX_ENV_VARS {
            return Err(SpecError::new(
                "executable.env",
                format!("at most {MAX_ENV_VARS} variables, got {}", self.env.len()),
            ));
        }
        let env_bytes: usize = self.env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        if env_bytes > MAX_ENV_BYTES {
            return Err(SpecError::new(
                "executable.env",
                format!("at most {MAX_ENV_BYTES} bytes in all, got {env_bytes}"),
            ));
        }
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
                    format!("executable.env.{}", key.escape_debug()),
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
        if let Some(period) = limits.cpu_period {
            if !CPU_PERIOD_RANGE.contains(&period) {
                return Err(SpecError::new(
                    "executable.resource_limits.cpu_period",
                    format!(
                        "must be between {} and {} microseconds, got {period}",
                        CPU_PERIOD_RANGE.start(),
                        CPU_PERIOD_RANGE.end()
                    ),
                ));
            }
        }
        if let Some(percent) = limits.cpu_period_percent {
            if percent > MAX_CPU_PERIOD_PERCENT {
                return Err(SpecError::new(
                    "executable.resource_limits.cpu_period_percent",
                    format!("must be at most {MAX_CPU_PERIOD_PERCENT}, got {percent}"),
                ));
            }
            let quota = limits.cpu_quota().unwrap_or_default();
            if quota < MIN_CPU_QUOTA {
                return Err(SpecError::new(
                    "executable.resource_limits.cpu_period_percent",
                    format!(
                        "{percent}% of a {} microsecond period is {quota} microseconds; the least is {MIN_CPU_QUOTA}",
                        limits.cpu_period.unwrap_or(DEFAULT_CPU_PERIOD)
                    ),
                ));
            }
        }
        if let Some(memory) = limits.memory_limit_bytes {
            if memory < MIN_MEMORY_LIMIT_BYTES {
                return Err(SpecError::new(
                    "executable.resource_limits.memory_limit_bytes",
                    format!("must be at least {MIN_MEMORY_LIMIT_BYTES} (6 MiB), got {memory}"),
                ));
            }
        }
        if let Some(MountSpec::Path(path)) = &self.mount {
            validate_mount_path(path)?;
        }
        if let Some(network) = &self.network_name {
            validate_network_name(network)?;
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

/// Where a deserialization error is, as a field path (`resource_limits.cpu_period`,
/// `command[1]`, `env.A`); empty for the value itself. An unknown field is
/// reported at the object that holds it, not as a field of its own.
pub fn error_field_path<E: fmt::Display>(error: &serde_path_to_error::Error<E>) -> String {
    use serde_path_to_error::Segment;
    let mut segments: Vec<&Segment> = error.path().iter().collect();
    if error.inner().to_string().starts_with("unknown field `") {
        segments.pop();
    }
    let mut path = String::new();
    for segment in segments {
        let name = match segment {
            Segment::Seq { index } => {
                path.push_str(&format!("[{index}]"));
                continue;
            }
            Segment::Map { key } => key.escape_debug().to_string(),
            Segment::Enum { variant } => variant.escape_debug().to_string(),
            Segment::Unknown => "?".to_string(),
        };
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(&name);
    }
    path
}

/// serde reads a struct from a JSON array too (`["busybox"]` as `{"image": "busybox"}`);
/// the API takes objects only, so arrays where an object belongs are refused.
fn refuse_sequences_as_objects(value: &serde_json::Value) -> Result<(), SpecError> {
    let refuse = |field: String, what: &str| {
        Err(SpecError::new(
            field,
            format!("invalid type: sequence, expected struct {what}"),
        ))
    };
    if value.is_array() {
        return refuse("executable".into(), "ExecutorSpec");
    }
    for (key, what) in [
        ("credentials", "RegistryCredentials"),
        ("resource_limits", "ResourceLimits"),
    ] {
        if value.get(key).is_some_and(serde_json::Value::is_array) {
            return refuse(format!("executable.{key}"), what);
        }
    }
    Ok(())
}

/// Longest repository name Docker accepts (registry host included).
const MAX_IMAGE_NAME_LEN: usize = 255;

/// Checks an image reference against Docker's grammar:
/// `[host[:port]/]path[:tag][@algorithm:hex]`, lowercase path components.
fn validate_image(image: &str) -> Result<(), SpecError> {
    let field = "executable.image";
    let error = |message: String| Err(SpecError::new(field, message));
    if image.trim().is_empty() {
        return error("must not be empty".into());
    }
    if let Some(bad) = image
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || !c.is_ascii())
    {
        return error(format!("invalid character {bad:?} in image reference"));
    }
    let (name_and_tag, digest) = match image.split_once('@') {
        Some((before, digest)) => (before, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let valid = digest.split_once(':').is_some_and(|(algorithm, hex)| {
            !algorithm.is_empty()
                && algorithm.starts_with(|c: char| c.is_ascii_alphabetic())
                && algorithm
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_+.".contains(c))
                && hex.len() >= 32
                && hex.chars().all(|c| c.is_ascii_hexdigit())
        });
        if !valid {
            return error(format!("invalid digest {digest:?} (expected algorithm:hex)"));
        }
    }
    // A colon after the last slash starts the tag; one before it is a registry port.
    let (name, tag) = match name_and_tag.rfind(':') {
        Some(colon) if !name_and_tag[colon..].contains('/') => {
            (&name_and_tag[..colon], Some(&name_and_tag[colon + 1..]))
        }
        _ => (name_and_tag, None),
    };
    if let Some(tag) = tag {
        let valid = !tag.is_empty()
            && tag.len() <= 128
            && !tag.starts_with(['.', '-'])
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid {
            return error(format!(
                "invalid tag {tag:?} (letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-')"
            ));
        }
    }
    if name.len() > MAX_IMAGE_NAME_LEN {
        return error(format!(
            "repository name is longer than {MAX_IMAGE_NAME_LEN} characters"
        ));
    }
    let path = match name.split_once('/') {
        // The first component is a registry host when it looks like one; hosts may be mixed case.
        Some((host, rest)) if host.contains('.') || host.contains(':') || host == "localhost" => {
            if !valid_registry_host(host) {
                return error(format!("invalid registry host {host:?}"));
            }
            rest
        }
        _ => name,
    };
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return error("repository name must be lowercase".into());
    }
    for component in path.split('/') {
        if !valid_path_component(component) {
            return error(format!(
                "invalid repository name component {component:?} (lowercase letters and digits, separated by '.', '_', '__' or dashes)"
            ));
        }
    }
    Ok(())
}

/// `host[:port]`: dot-separated labels of letters, digits and inner dashes.
fn valid_registry_host(host: &str) -> bool {
    let (hostname, port) = match host.rsplit_once(':') {
        Some((hostname, port)) => (hostname, Some(port)),
        None => (host, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.chars().all(|c| c.is_ascii_digit()));
    let labels_ok = !hostname.is_empty()
        && hostname.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    port_ok && labels_ok
}

/// One path component: `[a-z0-9]+` runs joined by `.`, `_`, `__` or dashes.
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Docker network names: a letter or digit, then letters, digits, `_`, `.`, `-`.
/// `host` and `none` are refused: the first would share the host's network
/// namespace, the second leaves the backend unreachable.
fn validate_network_name(network: &str) -> Result<(), SpecError> {
    let field = "executable.network_name";
    if network.is_empty() {
        return Err(SpecError::new(field, "must not be empty"));
    }
    let valid = network.len() <= 128
        && network.starts_with(|c: char| c.is_ascii_alphanumeric())
        && network
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !valid {
        return Err(SpecError::new(
            field,
            format!("invalid network name {network:?} (letters, digits, '_', '.', '-'; at most 128)"),
        ));
    }
    if network == "host" || network == "none" {
        return Err(SpecError::new(
            field,
            format!("network {network:?} is not allowed: a backend needs its own network namespace and a published port"),
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
    if path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(SpecError::new(field, "path may not contain NUL"));
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
    if !path.components().any(|c| matches!(c, Component::Normal(_))) {
        return Err(SpecError::new(
            field,
            "path must name a folder under the mount base, not the base itself",
        ));
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
            "resource_limits": {"cpu_period": 100000, "cpu_period_percent": 50, "memory_limit_bytes": 10000000},
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
    fn image_references_follow_dockers_grammar() {
        let accepted = |image: &str| validate_image(image).is_ok();
        for good in [
            "busybox",
            "busybox:1.36",
            "library/busybox:latest",
            "org/a.b-c__d/e_f:Tag-1.0",
            "localhost:5000/x",
            "127.0.0.1:5000/x/y:v1",
            "Registry.Example.COM/org/app",
            "ghcr.io/org/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "app:v1@sha256:0123456789abcdef0123456789abcdef",
        ] {
            assert!(accepted(good), "{good} refused: {:?}", validate_image(good));
        }
        for bad in [
            "", "Busybox", "org/App", "a b", "a\tb", "b\u{fc}sybox", "busybox:", "busybox:-x",
            "a//b", "a/", "/a", "a..b", "a-", "-a", "_a", "a___b", "busybox@sha256:abc",
            "busybox@:0123456789abcdef0123456789abcdef", "-host.io/a", "host.io:port/a",
        ] {
            assert!(!accepted(bad), "{bad:?} accepted");
        }
        assert!(!accepted(&format!("busybox:{}", "t".repeat(129))));
        assert!(!accepted(&format!("a/{}", "b".repeat(254))));
    }

    #[test]
    fn limits_are_bounded_where_docker_and_the_kernel_bound_them() {
        let limits = |value: serde_json::Value| {
            ExecutorSpec::from_json(json!({"image": "x", "resource_limits": value}))
        };
        assert!(limits(json!({"cpu_period": 1_000, "cpu_period_percent": 100})).is_ok());
        assert!(limits(json!({"cpu_period": 1_000_000, "cpu_period_percent": 100_000})).is_ok());
        assert!(limits(json!({"memory_limit_bytes": MIN_MEMORY_LIMIT_BYTES})).is_ok());
        assert!(limits(json!({"cpu_period": 999})).is_err());
        assert!(limits(json!({"cpu_period": 1_000, "cpu_period_percent": 99})).is_err());
        assert!(limits(json!({"cpu_period_percent": 100_001})).is_err());
        assert!(limits(json!({"memory_limit_bytes": MIN_MEMORY_LIMIT_BYTES - 1})).is_err());
        let spec = limits(json!({"cpu_period": 50_000, "cpu_period_percent": 250})).unwrap();
        assert_eq!(spec.resource_limits.cpu_quota(), Some(125_000));
    }

    #[test]
    fn env_networks_and_mounts_are_bounded() {
        let spec = |value: serde_json::Value| ExecutorSpec::from_json(value);
        let env: BTreeMap<String, String> =
            (0..MAX_ENV_VARS).map(|i| (format!("V{i}"), String::new())).collect();
        assert!(spec(json!({"image": "x", "env": env})).is_ok());
        let mut too_many = env.clone();
        too_many.insert("ONE_MORE".into(), String::new());
        assert_eq!(
            spec(json!({"image": "x", "env": too_many})).unwrap_err().to_string(),
            "executable.env: at most 1000 variables, got 1001"
        );
        for network in ["host", "none", "container:x", "a b", "-net"] {
            assert_eq!(
                spec(json!({"image": "x", "network_name": network})).unwrap_err().field,
                "executable.network_name",
                "{network}"
            );
        }
        assert!(spec(json!({"image": "x", "network_name": "my_net.1-a"})).is_ok());
        for mount in [".", "./", "a/..", "a\u{0}"] {
            assert_eq!(
                spec(json!({"image": "x", "mount": mount})).unwrap_err().field,
                "executable.mount",
                "{mount:?}"
            );
        }
    }

    #[test]
    fn type_errors_name_the_nested_field_and_arrays_are_not_objects() {
        let err = |value: serde_json::Value| ExecutorSpec::from_json(value).unwrap_err().to_string();
        assert_eq!(
            err(json!({"image": "x", "resource_limits": {"cpu_period": "1"}})),
            "executable.resource_limits.cpu_period: invalid type: string \"1\", expected i64"
        );
        assert_eq!(
            err(json!({"image": "x", "command": ["a", 1]})),
            "executable.command[1]: invalid type: integer `1`, expected a string"
        );
        assert_eq!(
            err(json!({"image": "x", "resource_limits": {"gpus": 1}})).split(',').next().unwrap(),
            "executable.resource_limits: unknown field `gpus`"
        );
        assert_eq!(
            err(json!(["busybox"])),
            "executable: invalid type: sequence, expected struct ExecutorSpec"
        );
        assert_eq!(
            err(json!({"image": "x", "resource_limits": [100000]})),
            "executable.resource_limits: invalid type: sequence, expected struct ResourceLimits"
        );
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
