//! Named crash points for crash-safety tests.
//!
//! With the `crash-points` feature (enabled for test builds only), a call to
//! [`point`] whose name equals the `DROVER_CRASH_AT` environment variable kills
//! the process with SIGKILL on the spot, exactly like `kill -9` at that step.
//! Without the feature, [`point`] compiles to nothing.

/// Every crash point, in lifecycle order, so tests can iterate over them.
pub const POINTS: &[&str] = &[
    "after_loading_recorded",
    "before_pull",
    "after_pull",
    "after_starting_recorded",
    "after_create",
    "after_start",
    "after_waiting_recorded",
    "after_terminating_recorded",
    "after_hard_terminating_recorded",
    "before_exit_recorded",
];

#[cfg(feature = "crash-points")]
pub fn point(name: &str) {
    debug_assert!(POINTS.contains(&name), "unknown crash point {name}");
    if std::env::var("DROVER_CRASH_AT").as_deref() == Ok(name) {
        eprintln!("drover: crash point {name} reached, killing the process");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn point(_name: &str) {}
