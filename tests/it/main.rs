//! drover's integration tests: one binary, real Docker engine, real SQLite
//! files. Every test starts its own daemon (own database, port and instance
//! label), so tests run in parallel without touching each other's containers.

mod support;

mod api;
mod cli;
mod crash;
mod engine;
mod faults;
mod hostile;
mod isolation;
mod lifecycle;
mod limits;
mod metrics;
mod registry_pull;
mod prune;
mod sql;
mod events;
mod runtime;
mod security;
