//! The tests that need a process with few others in it: a binary of their own, apart from the
//! large integration-test binary (`tests/it`).
//!
//! * `decoded` and `footprint` measure the memory of their process (the large binary's resident
//!   memory grows in other ways too: 5 MiB more for the same 16,000 records, measured); each
//!   measurement runs in a child process of this binary, started with `--exact` on it.
//! * `observability` installs tracing subscribers per thread: in a process running hundreds of
//!   other tests at once, tracing's global interest cache and level hint (rebuilt as other
//!   threads set their own subscribers) dropped some of its events.

#[macro_use]
#[path = "../it/support/mod.rs"]
mod support;

mod decoded;
mod footprint;
mod observability;
