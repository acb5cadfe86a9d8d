//! Heap allocations per store call, counted (dhat): a fresh key's claim and completion with a
//! 1.1 KiB record, and a replay's claim, on each store whose server is there. Deterministic,
//! so a change that removes a copy shows where time cannot resolve it:
//! `cargo bench --bench store_allocations` (Redis and PostgreSQL as in `stores.rs`).

mod fleet;
#[path = "../tests/it/support/servers.rs"]
mod servers;

use std::time::Duration;

use bytes::Bytes;
use tower_idempotency::store::{ClaimOutcome, MemoryStore, Record, Store};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const CALLS: u64 = 2_000;
const PAYLOAD: usize = 1100;

/// Allocations and bytes allocated per call of `call(i)`, over `CALLS` calls after a warm-up.
fn per_call<F, Fut>(rt: &tokio::runtime::Runtime, call: F) -> (f64, f64)
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    rt.block_on(async {
        for i in 0..100 {
            call(u64::MAX - i).await;
        }
        let before = dhat::HeapStats::get();
        for i in 0..CALLS {
            call(i).await;
        }
        let after = dhat::HeapStats::get();
        (
            (after.total_blocks - before.total_blocks) as f64 / CALLS as f64,
            (after.total_bytes - before.total_bytes) as f64 / CALLS as f64,
        )
    })
}

fn measure<St: Store>(rt: &tokio::runtime::Runtime, name: &str, store: &St) {
    let run = std::process::id();
    let lease = Duration::from_secs(60);
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let fresh = per_call(rt, |i| {
        let (store, payload) = (store, payload.clone());
        async move {
            let key = format!("alloc-{run}-fresh-{i}");
            let ClaimOutcome::Claimed(token) = store.claim(&key, lease).await.unwrap() else {
                panic!("{key} was fresh")
            };
            let record = Record::new(Some(7), payload);
            store.complete(&key, &token, record, lease).await.unwrap();
        }
    });
    let replayed = format!("alloc-{run}-replayed");
    rt.block_on(async {
        if let ClaimOutcome::Claimed(token) = store.claim(&replayed, lease).await.unwrap() {
            let record = Record::new(Some(7), payload.clone());
            store
                .complete(&replayed, &token, record, lease)
                .await
                .unwrap();
        }
    });
    let replay = per_call(rt, |_| {
        let (store, key) = (store, &replayed);
        async move {
            let outcome = store.claim(key, lease).await.unwrap();
            assert!(matches!(outcome, ClaimOutcome::Completed(_)));
        }
    });
    println!(
        "| {name} | {:.1} ({:.0} B) | {:.1} ({:.0} B) |",
        fresh.0, fresh.1, replay.0, replay.1
    );
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (redis, postgres) = fleet::fleet_stores(&rt, "store_allocations");
    println!("| store | fresh key: claim and completion (bytes) | replay: claim (bytes) |");
    println!("|---|---:|---:|");
    measure(&rt, "memory", &MemoryStore::new());
    if let Some(redis) = &redis {
        measure(&rt, "Redis", redis);
    }
    if let Some(postgres) = &postgres {
        measure(&rt, "PostgreSQL", postgres);
    }
}
