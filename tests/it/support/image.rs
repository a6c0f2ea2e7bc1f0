//! The local test image that integration tests run as session backends.
//!
//! `drover-test/busybox:latest` is built by `scripts/test-image` with
//! `docker import` from the host's static busybox (nothing is pulled: the
//! test machines have no container registry). It holds `/bin/busybox` with a
//! `/bin/<applet>` symlink per applet (`sh`, `sleep`, `httpd`, `wget`, `nc`,
//! ...), `PATH=/bin`, `/tmp`, `/etc/passwd` and `/etc/group` with root and
//! nobody, and `/www/index.html` containing `hello from drover-test\n`. Its
//! default command serves `/www` with `httpd` in the foreground on
//! `${PORT:-8080}`.
//!
//! `scripts/test` builds the image before `cargo test`; [`test_image`] builds
//! it again if needed (cheap when it is up to date), so a plain `cargo test`
//! on a machine with Docker and busybox-static works too.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

const IMAGE: &str = "drover-test/busybox:latest";

/// Returns the reference of the test image, `"drover-test/busybox:latest"`,
/// after making sure it exists in the local Docker engine.
///
/// The first call in a process runs `scripts/test-image` (idempotent, and safe
/// when several test processes run it at once); later calls return at once.
/// Callers running at the same time wait for the first call to finish.
///
/// # Panics
///
/// Panics with the script's output if `scripts/test-image` cannot be run or
/// fails (no Docker engine, no static `/bin/busybox`, ...). A later call
/// tries again.
pub fn test_image() -> &'static str {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-image");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", script.display()));
        if !out.status.success() {
            panic!(
                "{} failed ({}):\n--- stderr ---\n{}--- stdout ---\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout),
            );
        }
    });
    IMAGE
}
