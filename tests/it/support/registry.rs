//! A real image registry on a loopback port, for tests that need drover to
//! pull: Debian's `docker-registry` (the CNCF distribution registry), with
//! filesystem storage in a temp dir and no auth (until
//! [`Registry::require_auth`] turns on htpasswd basic auth).
//!
//! The Docker engine treats registries on 127.0.0.0/8 as insecure (plain
//! HTTP) by default, so nothing in the engine's config changes. Dropping the
//! [`Registry`] kills the process, removes its storage, and removes every
//! image reference the test tagged or pulled through it (never the image they
//! were tagged from).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = "/usr/bin/docker-registry";

pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
    /// References in this registry's name space that a test created locally.
    references: Vec<String>,
}

impl Registry {
    /// Starts a registry on a free loopback port and waits until it answers.
    pub async fn start() -> Registry {
        assert!(
            Path::new(BINARY).exists(),
            "{BINARY} is missing: install Debian's docker-registry package"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let port = super::free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(BINARY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start docker-registry");
        let mut registry = Registry {
            child,
            dir,
            port,
            references: Vec::new(),
        };
        registry.wait_ready().await;
        registry
    }

    async fn wait_ready(&mut self) {
        let url = format!("http://127.0.0.1:{}/v2/", self.port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("docker-registry exited with {status}; log:\n{}", self.log());
            }
            if let Ok(response) = reqwest::get(&url).await {
                if response.status().is_success() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "registry not ready in 20s; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// The reference `127.0.0.1:PORT/name` in this registry.
    pub fn reference(&self, name: &str) -> String {
        format!("127.0.0.1:{}/{name}", self.port)
    }

    /// Tags the local image `source` as `name` in this registry, pushes it,
    /// and removes the local tag again, so pulling it is a real pull.
    /// Returns the reference.
    pub fn push(&mut self, source: &str, name: &str) -> String {
        let reference = self.reference(name);
        self.references.push(reference.clone());
        super::docker(&["tag", source, &reference]);
        super::docker(&["push", &reference]);
        super::docker(&["rmi", &reference]);
        reference
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reference in &self.references {
            // Gone already when the test (or drover) removed it.
            let _ = super::try_docker(&["rmi", reference]);
        }
    }
}

impl Registry {
    /// Restarts this registry on the same port and storage (pushed images
    /// stay) requiring HTTP basic auth for `user`:`password`, from an
    /// htpasswd file with a bcrypt hash as the registry wants. Push before
    /// calling this: pushing to it afterwards would need `docker login`,
    /// which writes the Docker client's config shared by every test.
    pub async fn require_auth(&mut self, user: &str, password: &str) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let htpasswd = self.dir.path().join("htpasswd");
        // Cost 4, bcrypt's least: the registry checks any cost, and tests stay fast.
        let hash = bcrypt::hash(password, 4).expect("bcrypt hash");
        std::fs::write(&htpasswd, format!("{user}:{hash}\n")).unwrap();
        let config = self.dir.path().join("config.yml");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: drover-test\n    path: {}\n",
            htpasswd.display()
        ));
        std::fs::write(&config, text).unwrap();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("registry.log"))
            .unwrap();
        self.child = Command::new(BINARY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("restart docker-registry");
        // Ready when it answers, and answers an anonymous client with 401.
        let url = format!("http://127.0.0.1:{}/v2/", self.port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("docker-registry exited with {status}; log:\n{}", self.log());
            }
            if let Ok(response) = reqwest::get(&url).await {
                assert_eq!(response.status().as_u16(), 401, "registry did not require auth");
                let authorized = reqwest::Client::new()
                    .get(&url)
                    .basic_auth(user, Some(password))
                    .send()
                    .await
                    .expect("GET /v2/ with auth");
                assert!(authorized.status().is_success(), "credentials refused: {}", authorized.status());
                return;
            }
            assert!(Instant::now() < deadline, "registry not ready in 20s; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How many times the Docker engine pulled `reference` (with its tag) between
/// `since` (Unix seconds) and now, from the engine's own image events.
pub fn pulls_of(reference: &str, since: i64) -> usize {
    let until = format!("{:.3}", chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
    super::docker(&[
        "events",
        "--since",
        &since.to_string(),
        "--until",
        &until,
        "--filter",
        "type=image",
        "--filter",
        "event=pull",
        "--format",
        "{{.Actor.ID}}",
    ])
    .lines()
    .filter(|line| *line == reference)
    .count()
}
