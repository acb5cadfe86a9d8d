//! What eviction costs, by capacity: a fresh key's claim and completion on a memory store that
//! is full (every completion evicts a record) next to one that is not, and the same for moka
//! alone in the store's configuration. `cargo bench --bench eviction` prints the table of
//! `BENCHMARKS.md`; medians of interleaved rounds.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tower_idempotency::store::{ClaimOutcome, MemoryStore, Record, Store};

const PAYLOAD: usize = 1100;
const TIMED: usize = 50_000;
const ROUNDS: usize = 5;

fn key(i: usize) -> String {
    format!("tenant-{:08}|POST|/payments|{i:032}", i % 1000)
}

/// Nanoseconds per claim and completion of `TIMED` fresh keys, on a store of `capacity`
/// bytes, full (first filled with three times what it holds) or not.
fn store_round(rt: &tokio::runtime::Runtime, capacity: u64, full: bool) -> f64 {
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let fresh = || MemoryStore::builder().max_bytes(capacity).build();
    let mut store = fresh();
    let fill = |store: &MemoryStore, from: usize, to: usize| {
        rt.block_on(async {
            for i in from..to {
                let key = key(i);
                let ClaimOutcome::Claimed(token) =
                    store.claim(&key, Duration::from_secs(60)).await.unwrap()
                else {
                    unreachable!("fresh key")
                };
                store
                    .complete(
                        &key,
                        &token,
                        Record::new(Some(i as u128), payload.clone()),
                        Duration::from_secs(3600),
                    )
                    .await
                    .unwrap();
            }
        })
    };
    let per_record = PAYLOAD as u64 + 60 + 560;
    if full {
        fill(&store, 0, (3 * capacity / per_record) as usize);
        store.record_count();
    }
    // Not full: a new store whenever the next batch could fill it (made outside the timing).
    let batch = if full {
        TIMED
    } else {
        ((capacity / per_record) as usize / 2).clamp(1, TIMED)
    };
    let mut elapsed = Duration::ZERO;
    let mut done = 0;
    while done < TIMED {
        if !full {
            store = fresh();
        }
        let n = batch.min(TIMED - done);
        let start = Instant::now();
        fill(&store, 10_000_000 + done, 10_000_000 + done + n);
        elapsed += start.elapsed();
        done += n;
    }
    elapsed.as_nanos() as f64 / TIMED as f64
}

/// The same for moka alone: inserts of fresh 64-bit keys with the store's eviction policy,
/// weigher and per-entry expiry.
fn moka_round(capacity: u64, full: bool) -> f64 {
    #[derive(Clone)]
    struct Value(#[allow(dead_code)] Bytes);
    struct Expiry;
    impl moka::Expiry<u64, Value> for Expiry {
        fn expire_after_create(&self, _: &u64, _: &Value, _: Instant) -> Option<Duration> {
            Some(Duration::from_secs(3600))
        }
    }
    let per_record = PAYLOAD as u64 + 60 + 560;
    let fresh = move || {
        moka::sync::Cache::builder()
            .max_capacity(capacity)
            .initial_capacity(((capacity / 1536) as usize).min(1 << 16))
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .weigher(move |_: &u64, _: &Value| per_record as u32)
            .expire_after(Expiry)
            .build_with_hasher(ahash::RandomState::new())
    };
    let mut cache = fresh();
    let insert = |cache: &moka::sync::Cache<u64, Value, ahash::RandomState>, from, to| {
        for i in from..to {
            cache.insert(i, Value(Bytes::from(vec![b'x'; PAYLOAD])));
        }
    };
    if full {
        insert(&cache, 0, 3 * capacity / per_record);
        cache.run_pending_tasks();
    }
    let batch = if full {
        TIMED as u64
    } else {
        (capacity / per_record / 2).clamp(1, TIMED as u64)
    };
    let mut elapsed = Duration::ZERO;
    let mut done = 0;
    while done < TIMED as u64 {
        if !full {
            cache = fresh();
        }
        let n = batch.min(TIMED as u64 - done);
        let start = Instant::now();
        insert(&cache, 10_000_000 + done, 10_000_000 + done + n);
        elapsed += start.elapsed();
        done += n;
    }
    elapsed.as_nanos() as f64 / TIMED as f64
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("| capacity | store, not full | store, full | full / not full | moka alone, not full | moka alone, full | full / not full |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for mib in [1u64, 4, 16, 64, 256] {
        let capacity = mib << 20;
        let mut rows: [Vec<f64>; 4] = Default::default();
        for _ in 0..ROUNDS {
            rows[0].push(store_round(&rt, capacity, false));
            rows[1].push(store_round(&rt, capacity, true));
            rows[2].push(moka_round(capacity, false));
            rows[3].push(moka_round(capacity, true));
        }
        let [a, b, c, d] = rows.map(median);
        println!(
            "| {mib} MiB | {a:.0} ns | {b:.0} ns | {:.2} | {c:.0} ns | {d:.0} ns | {:.2} |",
            b / a,
            d / c
        );
    }
}
