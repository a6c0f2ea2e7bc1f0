//! A private Docker engine, for tests that stop and start the engine under a
//! running drover without touching the machine's shared engine (other tests
//! run on it at the same time).
//!
//! [`PrivateEngine::start`] runs its own `dockerd`, which starts and manages
//! its own containerd, with its own socket, data root, exec root, containerd
//! namespaces and pid file, a config file of its own (so the host's
//! `/etc/docker/daemon.json` is not read), the `vfs` storage driver, and a
//! bridge of its own (`drvt<pid>n<k>`, with a free /24 out of
//! 172.31.200.0–172.31.254.0). iptables is off: a published port is served by
//! Docker's userland proxy on the host, so the host's firewall is never
//! written. Live restore is off, so containers die with the engine. It loads
//! the test image with `scripts/test-image`.
//!
//! [`stop`](PrivateEngine::stop) stops the engine the way an operator's
//! `systemctl stop docker` does (SIGTERM, then wait for it to exit);
//! [`kill`](PrivateEngine::kill) crashes it (SIGKILL: its containers run on
//! without it); [`start_again`](PrivateEngine::start_again) starts it with
//! the very same command line. Dropping the engine removes every trace, also when the test
//! failed: its containers, its processes, the mounts under its folder, its
//! bridge and its folder. What a test run killed before it could drop its
//! engines left behind (its dockerd got SIGTERM when the run died) is
//! removed by the next start: folders and bridges name their owner's pid.
//!
//! Needs root, `dockerd` and `docker` (Debian's docker.io), `ip` (iproute2)
//! and the static busybox of the test image; `scripts/test` installs them.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a starting engine may take to answer `/_ping`. A restart after
/// a crash first stops the containers it finds still running, up to their
/// 10 s stop timeout.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopping engine may take to exit: it first stops its running
/// containers, each within its stop timeout (10 s by default).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The third octet of the subnets tried for the bridge: 172.31.<n>.0/24.
const SUBNET_THIRD_OCTETS: std::ops::RangeInclusive<u8> = 200..=254;

static ENGINES_STARTED: AtomicU32 = AtomicU32::new(0);

/// Temp folders of private engines are named `drover-engine.*`.
const DIR_PREFIX: &str = "drover-engine.";
/// File in an engine's folder holding the pid of the test process owning it.
const OWNER_FILE: &str = "owner.pid";

/// A `dockerd` of the test's own. See the module docs.
pub struct PrivateEngine {
    dir: PathBuf,
    /// The bridge's name; also names the containerd namespaces.
    name: String,
    bridge_created: bool,
    /// The subnet of the bridge, e.g. `172.31.200.0/24`.
    subnet: String,
    /// `dockerd`'s arguments: the same for every start.
    args: Vec<String>,
    child: Option<Child>,
}

impl PrivateEngine {
    /// Starts a private engine, waits until it answers and loads the test
    /// image into it.
    ///
    /// Call it (and [`start_again`](Self::start_again)) from the test's own
    /// thread, not from a blocking-pool thread: `dockerd` gets SIGTERM when
    /// the thread that started it ends, so a killed test run does not leave
    /// it behind.
    ///
    /// # Panics
    ///
    /// When not root, when `dockerd` or `ip` is missing, or when the engine
    /// does not answer in time (with the tail of its log).
    pub fn start() -> PrivateEngine {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "a private docker engine needs root (it creates a bridge and runs dockerd)"
        );
        for tool in ["dockerd", "docker", "ip"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
                "{tool} not found (dockerd and docker: Debian's docker.io; ip: iproute2)"
            );
        }
        remove_leftovers_of_dead_runs();
        let name = format!(
            "drvt{}n{}",
            std::process::id(),
            ENGINES_STARTED.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .expect("temp dir for the private engine")
            .keep();
        let mut engine = PrivateEngine {
            dir,
            name,
            bridge_created: false,
            subnet: String::new(),
            args: Vec::new(),
            child: None,
        };
        // From here on, a panic drops `engine`, which cleans up what exists.
        let socket = engine.socket_path();
        assert!(
            engine.dir.join("exec/containerd/containerd.sock.ttrpc").as_os_str().len() < 100,
            "temp dir {} too long for unix socket paths; set TMPDIR to a shorter one",
            engine.dir.display()
        );
        std::fs::write(engine.dir.join("daemon.json"), "{}\n").expect("write daemon.json");
        std::fs::write(engine.dir.join(OWNER_FILE), std::process::id().to_string())
            .expect("write owner file");
        engine.create_bridge();
        let dir = engine.dir.display().to_string();
        engine.args = vec![
            format!("--config-file={dir}/daemon.json"),
            format!("--host=unix://{}", socket.display()),
            format!("--data-root={dir}/data"),
            format!("--exec-root={dir}/exec"),
            format!("--pidfile={dir}/dockerd.pid"),
            format!("--containerd-namespace={}", engine.name),
            format!("--containerd-plugins-namespace={}-plugins", engine.name),
            format!("--bridge={}", engine.name),
            "--iptables=false".to_string(),
            "--ip-masq=false".to_string(),
            "--ip-forward=false".to_string(),
            "--userland-proxy=true".to_string(),
            "--storage-driver=vfs".to_string(),
            "--live-restore=false".to_string(),
        ];
        engine.launch();
        engine.load_test_image();
        engine
    }

    /// The engine's address as `DOCKER_HOST` takes it.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket_path().display())
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }

    /// The bridge's subnet, e.g. `172.31.200.0/24`.
    pub fn subnet(&self) -> &str {
        &self.subnet
    }

    /// The full `dockerd` command line, as started every time.
    pub fn command_line(&self) -> String {
        format!("dockerd {}", self.args.join(" "))
    }

    /// The last `lines` lines of dockerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Whether the engine answers `GET /_ping` with `OK` right now.
    pub fn answers(&self) -> bool {
        let attempt = || -> std::io::Result<bool> {
            let mut stream = UnixStream::connect(self.socket_path())?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.set_write_timeout(Some(Duration::from_secs(2)))?;
            stream.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response.starts_with("HTTP/1.") && response.contains(" 200 ") && response.ends_with("OK"))
        };
        attempt().unwrap_or(false)
    }

    /// Runs the docker CLI against this engine; returns trimmed stdout.
    pub fn docker(&self, args: &[&str]) -> String {
        let output = self.docker_command(args).output().expect("run docker");
        assert!(
            output.status.success(),
            "docker -H {} {args:?} failed: {}",
            self.host(),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Like [`docker`](Self::docker), but `None` instead of panicking.
    pub fn try_docker(&self, args: &[&str]) -> Option<String> {
        let output = self.docker_command(args).output().ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    fn docker_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("docker");
        command
            .env("DOCKER_HOST", self.host())
            .env_remove("DOCKER_CONTEXT")
            .args(args)
            .stdin(Stdio::null());
        command
    }

    /// Stops the engine as `systemctl stop docker` does: SIGTERM, then waits
    /// for it to exit. With live restore off it first stops every running
    /// container (SIGTERM, SIGKILL after the container's stop timeout).
    ///
    /// # Panics
    ///
    /// When it has not exited within a minute (dropping the engine then kills it).
    pub fn stop(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("private engine is not running");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for dockerd") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "private dockerd did not exit within {STOP_TIMEOUT:?} of SIGTERM; log tail:\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Crashes the engine: SIGKILL, as an OOM kill or a `kill -9` would. Its
    /// containers keep running without it (their shims outlive it); started
    /// again with live restore off, the engine stops them. Returns once the
    /// engine's containerd is gone too: it dies with the engine, and while
    /// its pid is still taken (a zombie not yet reaped by init), a new
    /// dockerd waits for that containerd instead of starting its own, and
    /// gives up.
    ///
    /// # Panics
    ///
    /// When the old containerd is still there after a minute.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("private engine is not running");
        let containerd_pid = std::fs::read_to_string(self.dir.join("exec/containerd/containerd.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        let _ = child.kill();
        let _ = child.wait();
        let Some(pid) = containerd_pid else {
            return;
        };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                Instant::now() < deadline,
                "the crashed engine's containerd (pid {pid}) is still there after {STOP_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the engine again with the same command line, and waits until
    /// it answers.
    pub fn start_again(&mut self) {
        self.launch();
    }

    fn launch(&mut self) {
        assert!(self.child.is_none(), "private engine already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open dockerd log");
        let mut command = Command::new("dockerd");
        command
            .args(&self.args)
            .current_dir(&self.dir)
            .env_remove("DOCKER_HOST")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("dup log")))
            .stderr(Stdio::from(log));
        // SAFETY: prctl(2) is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        self.child = Some(command.spawn().expect("spawn dockerd"));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !self.is_running() {
                let status = self.child.take().and_then(|mut c| c.wait().ok());
                panic!(
                    "private dockerd exited ({status:?}) before answering; command line:\n{}\nlog tail:\n{}",
                    self.command_line(),
                    self.log_tail(40)
                );
            }
            if self.answers() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "private dockerd did not answer within {START_TIMEOUT:?}; log tail:\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn load_test_image(&self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-image");
        let output = Command::new("bash")
            .arg(&script)
            .env("DOCKER_HOST", self.host())
            .env_remove("DOCKER_CONTEXT")
            .output()
            .expect("run scripts/test-image");
        assert!(
            output.status.success(),
            "scripts/test-image failed on the private engine: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Creates the bridge with a /24 that no address or route of the host
    /// overlaps. A lock file keeps two engines starting at once from picking
    /// the same subnet.
    fn create_bridge(&mut self) {
        let lock_path = std::env::temp_dir().join("drover-private-engine.lock");
        let lock = File::create(&lock_path).expect("create the bridge lock file");
        // SAFETY: flock(2) on a descriptor we own; released when `lock` closes.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0, "flock");
        let taken = host_networks();
        let third = SUBNET_THIRD_OCTETS
            .into_iter()
            .find(|n| {
                let candidate = (Ipv4Addr::new(172, 31, *n, 0), 24);
                !taken.iter().any(|net| overlaps(*net, candidate))
            })
            .unwrap_or_else(|| panic!("no free /24 in 172.31.200.0-172.31.254.0; host networks: {taken:?}"));
        ip(&["link", "add", "name", &self.name, "type", "bridge"]);
        self.bridge_created = true;
        ip(&["addr", "add", &format!("172.31.{third}.1/24"), "dev", &self.name]);
        ip(&["link", "set", &self.name, "up"]);
        self.subnet = format!("172.31.{third}.0/24");
        drop(lock);
    }

    /// SIGTERM, then SIGKILL if the engine has not exited within `patience`.
    fn shut_down(&mut self, patience: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for PrivateEngine {
    fn drop(&mut self) {
        if self.is_running() {
            // Kill the containers first, so the engine's shutdown does not
            // wait out their stop timeouts.
            if let Some(ids) = self.try_docker(&["ps", "-aq"]) {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids);
                    let _ = self.try_docker(&args);
                }
            }
        }
        self.shut_down(Duration::from_secs(30));
        kill_processes_naming(&self.dir);
        unmount_under(&self.dir);
        if self.bridge_created {
            let _ = Command::new("ip")
                .args(["link", "delete", &self.name])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `ip` and panics with its stderr on failure.
fn ip(args: &[&str]) -> String {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// Every IPv4 network the host has an address in or a route to.
fn host_networks() -> Vec<(Ipv4Addr, u8)> {
    let addresses = ip(&["-4", "-o", "addr", "show"]);
    let routes = ip(&["-4", "route", "show", "table", "all"]);
    let from_addresses = addresses.lines().filter_map(|line| {
        let mut words = line.split_whitespace();
        words.find(|w| *w == "inet")?;
        parse_cidr(words.next()?)
    });
    let from_routes = routes.lines().filter_map(|line| {
        let mut words = line.split_whitespace();
        let first = words.next()?;
        // "local 10.0.0.1 dev ..." and "broadcast ..." in other tables.
        let network = if matches!(first, "local" | "broadcast" | "unicast") {
            words.next()?
        } else {
            first
        };
        parse_cidr(network)
    });
    from_addresses.chain(from_routes).collect()
}

fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (address, length) = match text.split_once('/') {
        Some((address, length)) => (address, length.parse().ok()?),
        None => (text, 32),
    };
    Some((address.parse().ok()?, length))
}

fn overlaps(a: (Ipv4Addr, u8), b: (Ipv4Addr, u8)) -> bool {
    let shorter = a.1.min(b.1).min(32);
    let mask = if shorter == 0 { 0 } else { u32::MAX << (32 - shorter) };
    (u32::from(a.0) & mask) == (u32::from(b.0) & mask)
}

/// Processes left by an engine that did not shut down cleanly: its dockerd,
/// containerd and shims (their command lines name the engine's folder), and
/// the containers' processes under the shims.
fn kill_processes_naming(dir: &Path) {
    let dir = dir.display().to_string();
    let me = std::process::id();
    let processes = processes();
    let owned: Vec<u32> = processes
        .iter()
        .filter(|p| p.pid != me && p.cmdline.contains(&dir))
        .map(|p| p.pid)
        .collect();
    for process in &processes {
        if owned.contains(&process.ppid) && !owned.contains(&process.pid) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(process.pid as i32, libc::SIGKILL);
            }
        }
    }
    for pid in owned {
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

/// Lazily unmounts every mount point under `dir`, deepest first (the data
/// root's bind mount, network namespaces, shm mounts).
fn unmount_under(dir: &Path) {
    let dir = dir.display().to_string();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|point| point == &dir || point.starts_with(&format!("{dir}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for point in points {
        if let Ok(path) = std::ffi::CString::new(point) {
            // SAFETY: a valid NUL-terminated path.
            unsafe {
                libc::umount2(path.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// Removes what engines of test processes that are gone left behind (a run
/// killed before its engines were dropped): their processes, mounts and
/// folders, and their bridges.
fn remove_leftovers_of_dead_runs() {
    let owner_gone = |pid: u32| !Path::new(&format!("/proc/{pid}")).exists();
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let is_engine_dir = entry.file_name().to_string_lossy().starts_with(DIR_PREFIX);
            let owner = std::fs::read_to_string(entry.path().join(OWNER_FILE))
                .ok()
                .and_then(|pid| pid.trim().parse::<u32>().ok());
            if let (true, Some(owner)) = (is_engine_dir, owner) {
                if owner_gone(owner) {
                    kill_processes_naming(&entry.path());
                    unmount_under(&entry.path());
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
    remove_stale_bridges(owner_gone);
}

/// Deletes bridges `drvt<pid>n<k>` whose test process is gone.
fn remove_stale_bridges(owner_gone: impl Fn(u32) -> bool) {
    let Ok(output) = Command::new("ip").args(["-o", "link", "show", "type", "bridge"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n)) else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("drvt")
            .and_then(|rest| rest.split_once('n'))
            .and_then(|(pid, k)| (k.chars().all(|c| c.is_ascii_digit()) && !k.is_empty()).then_some(pid))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if owner_gone(pid) {
            let _ = Command::new("ip").args(["link", "delete", name]).status();
        }
    }
}

struct ProcessInfo {
    pid: u32,
    ppid: u32,
    cmdline: String,
}

fn processes() -> Vec<ProcessInfo> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may hold spaces and parentheses: fields resume after the last ')'.
            let after_name = &stat[stat.rfind(')')? + 2..];
            let ppid = after_name.split(' ').nth(1)?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            Some(ProcessInfo { pid, ppid, cmdline })
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space...) of /proc/self/mountinfo.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
