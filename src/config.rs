//! The daemon's configuration: one typed struct, loaded once.
//!
//! Precedence: built-in defaults < the TOML file < `DROVER_*` environment
//! variables < command-line flags (applied by the CLI). Every key has a
//! default, so an empty file (or none) is a valid configuration; an unknown
//! key is an error that names it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The SQLite database holding desired state and history.
    pub db_path: PathBuf,
    /// Where the HTTP API listens.
    pub listen: SocketAddr,
    /// The IP put in backend addresses (`IP:PORT`).
    pub advertise_ip: IpAddr,
    /// Bearer token required by the API when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_token: Option<String>,
    pub docker: DockerConfig,
    pub reconcile: ReconcileConfig,
    pub metrics: MetricsConfig,
    pub prune: PruneConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            db_path: PathBuf::from("drover.db"),
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7171),
            advertise_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            api_token: None,
            docker: DockerConfig::default(),
            reconcile: ReconcileConfig::default(),
            metrics: MetricsConfig::default(),
            prune: PruneConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// Base folder for backend mounts; mount requests are refused when unset.
    pub mount_base: Option<PathBuf>,
    /// OCI runtime for backends (e.g. `runsc`); Docker's default when unset.
    pub runtime: Option<String>,
    /// Logging driver and options for backend containers; Docker's default when unset.
    pub log_config: Option<LogConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(rename = "type")]
    pub driver: String,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileConfig {
    /// How often the full list of containers is compared with the store, to
    /// catch anything the event stream missed.
    #[serde(with = "humantime_serde")]
    pub resync_interval: Duration,
    /// Time between SIGTERM and SIGKILL in a soft termination.
    #[serde(with = "humantime_serde")]
    pub soft_terminate_grace: Duration,
    /// Time a backend has from its container start to answer HTTP.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(5),
            soft_terminate_grace: Duration::from_secs(30),
            startup_timeout: Duration::from_secs(300),
        }
    }
}

/// The resource sampler (`metrics_samples`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Time between two samples of every running backend.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Samples older than this are deleted, a batch at a time, on every tick.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            retention: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// Removal of finished backends' containers and of idle images drover pulled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PruneConfig {
    /// Time between two prune passes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A container goes this long after its exit (not its creation); an
    /// image this long after a backend last used it.
    #[serde(with = "humantime_serde")]
    pub min_age: Duration,
    /// Also remove images drover pulled (never others).
    pub images: bool,
}

impl Default for PruneConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            min_age: Duration::from_secs(10 * 60),
            images: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid environment variable {name}: {message}")]
    Env { name: &'static str, message: String },
}

impl Config {
    /// Parses a TOML document; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.message().to_string(),
        })
    }

    /// Defaults, overlaid with the file at `path` if given, then `DROVER_*` env vars.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Self::from_toml(&text, path)?
            }
            None => Config::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        Ok(config)
    }

    /// Overlays `DROVER_DB`, `DROVER_LISTEN` and `DROVER_API_TOKEN`.
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(db) = lookup("DROVER_DB") {
            self.db_path = PathBuf::from(db);
        }
        if let Some(listen) = lookup("DROVER_LISTEN") {
            self.listen = listen.parse().map_err(|e| ConfigError::Env {
                name: "DROVER_LISTEN",
                message: format!("{e} (expected IP:PORT, got {listen:?})"),
            })?;
        }
        if let Some(token) = lookup("DROVER_API_TOKEN") {
            if !token.is_empty() {
                self.api_token = Some(token);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::from_toml("", Path::new("x.toml")).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.reconcile.resync_interval, Duration::from_secs(5));
        assert_eq!(config.reconcile.soft_terminate_grace, Duration::from_secs(30));
        assert_eq!(config.reconcile.startup_timeout, Duration::from_secs(300));
        assert_eq!(config.listen.to_string(), "127.0.0.1:7171");
    }

    #[test]
    fn documented_example_parses() {
        let text = include_str!("../config/drover.toml");
        let config = Config::from_toml(text, Path::new("config/drover.toml")).unwrap();
        let log = config.docker.log_config.unwrap();
        assert_eq!(log.driver, "json-file");
        assert_eq!(log.config["max-size"], "10m");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[reconcile]\nresync_intervall = \"1s\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("resync_intervall"), "{err}");
        let err = Config::from_toml("colour = 1\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn durations_are_human_strings() {
        let config = Config::from_toml(
            "[reconcile]\nresync_interval = \"250ms\"\nsoft_terminate_grace = \"2s\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(config.reconcile.resync_interval, Duration::from_millis(250));
        assert_eq!(config.reconcile.soft_terminate_grace, Duration::from_secs(2));
        let err = Config::from_toml("[reconcile]\nstartup_timeout = \"soon\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("startup_timeout") || err.contains("soon"), "{err}");
    }

    #[test]
    fn metrics_keys_default_and_parse() {
        let defaults = Config::default().metrics;
        assert_eq!(defaults.interval, Duration::from_secs(10));
        assert_eq!(defaults.retention, Duration::from_secs(86_400));
        let config = Config::from_toml(
            "[metrics]\ninterval = \"300ms\"\nretention = \"2s\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(config.metrics.interval, Duration::from_millis(300));
        assert_eq!(config.metrics.retention, Duration::from_secs(2));
        let err = Config::from_toml("[metrics]\nintervals = \"1s\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("intervals"), "{err}");
    }

    #[test]
    fn prune_keys_default_and_parse() {
        let defaults = Config::default().prune;
        assert_eq!(defaults.interval, Duration::from_secs(60));
        assert_eq!(defaults.min_age, Duration::from_secs(600));
        assert!(!defaults.images);
        let documented = Config::from_toml(include_str!("../config/drover.toml"), Path::new("drover.toml"))
            .unwrap()
            .prune;
        assert_eq!(documented, defaults);
        let config = Config::from_toml(
            "[prune]\ninterval = \"200ms\"\nmin_age = \"1s\"\nimages = true\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(config.prune.interval, Duration::from_millis(200));
        assert_eq!(config.prune.min_age, Duration::from_secs(1));
        assert!(config.prune.images);
        let err = Config::from_toml("[prune]\nmin_agee = \"1s\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("min_agee"), "{err}");
    }

    #[test]
    fn env_overrides_file() {
        let mut config = Config::default();
        config
            .apply_env(|name| match name {
                "DROVER_DB" => Some("/tmp/x.db".into()),
                "DROVER_LISTEN" => Some("127.0.0.1:9999".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.db_path, PathBuf::from("/tmp/x.db"));
        assert_eq!(config.listen.port(), 9999);
        let err = config
            .apply_env(|name| (name == "DROVER_LISTEN").then(|| "nope".to_string()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("DROVER_LISTEN"), "{err}");
    }
}
