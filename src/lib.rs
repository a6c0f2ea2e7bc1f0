//! drover: a per-host agent that runs session backends as Docker containers.
//!
//! Desired state lives in SQLite ([`store`]); a level-triggered loop
//! ([`reconciler`]) compares it with what Docker reports ([`docker`]), asks the
//! pure [`planner`] what to do, and has the [`executor`] do it. The HTTP
//! [`api`] and the [`cli`] sit on top; [`daemon`] wires it all together.
//! See `docs/architecture.md` for the map.

pub mod api;
pub mod check;
pub mod cli;
pub mod config;
pub mod crash;
pub mod daemon;
pub mod docker;
pub mod executor;
pub mod metrics;
pub mod model;
pub mod mounts;
pub mod planner;
pub mod prune;
pub mod reconciler;
pub mod runtime;
pub mod store;
