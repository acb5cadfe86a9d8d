//! The integration tests, in one binary (one link of the crate and its dependencies, instead
//! of one per file): each file is a module. `cargo test --test it MODULE` runs one of them,
//! e.g. `cargo test --test it store_redis`. The tests that need a process with few others in it
//! (memory measurements, per-thread tracing subscribers) are a binary of their own,
//! `tests/isolated`.
//!
//! Tests that need a server (`redis-server`, `valkey-server`, PostgreSQL's `initdb`/`pg_ctl`)
//! start their own on a free loopback port, and print `SKIPPED:` and pass without one (under
//! `CI`, they fail instead): see `support/servers.rs`.

#[macro_use]
mod support;

mod admin;
mod attack_44;
mod attack_45;
mod attack_points;
mod attack_redis_points;
mod chunked_records;
mod claim_now;
mod client;
mod compatibility;
mod concurrency;
mod conformance_memory;
mod consumer;
mod custom_store;
mod damaged_records;
mod demo_server;
mod demo_server_stream;
mod demo_sqlite;
mod docs_links;
mod drain;
mod fleet;
mod lifecycle;
mod live_stream;
mod memory_points;
mod recovery_points;
mod redis_failover;
mod safe_defaults;
mod shared_records;
mod store_postgres;
mod store_postgres_hot;
mod store_redis;
mod store_redis_cluster;
mod store_redis_commands;
mod store_redis_conditional;
mod store_redis_script;
mod store_sqlite;
mod store_streams;
mod stream_consumer;
mod tower_contract;
mod wait_lag;
