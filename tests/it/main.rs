//! drover's integration tests: one binary, real Docker engine, real SQLite
//! files. Every test starts its own daemon (own database, port and instance
//! label), so tests run in parallel without touching each other's containers.

mod support;

mod lifecycle;
