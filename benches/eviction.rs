//! What eviction costs, by capacity: a fresh key's claim and completion on a memory store that
//! is full (every completion evicts a record) next to one that is not, and the same for moka
//! alone in the store's configuration. `cargo bench --bench eviction` prints the table of
//! `BENCHMARKS.md`; medians of interleaved rounds.

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use bytes::Bytes;
use tower_idempotency::store::{ClaimOutcome, MemoryStore, Record, Store};

const PAYLOAD: usize = 1100;
/// What one record is charged against the capacity (key, payload, the store's overhead).
const PER_RECORD: u64 = PAYLOAD as u64 + 60 + 560;
const TIMED: u64 = 50_000;
const ROUNDS: usize = 5;

/// Nanoseconds per write of `TIMED` fresh records into a cache made by `make` with room for
/// `capacity` bytes: full (first given three times what it holds, so that every timed write
/// evicts) or not (a new cache whenever the next batch could fill it, made outside the timing).
/// `write(cache, from, to)` writes the records numbered `from..to`; `settle` runs the cache's
/// pending maintenance after the prefill.
fn round<C>(
    capacity: u64,
    full: bool,
    make: impl Fn() -> C,
    write: impl Fn(&C, u64, u64),
    settle: impl Fn(&C),
) -> f64 {
    let mut cache = make();
    let batch = if full {
        write(&cache, 0, 3 * capacity / PER_RECORD);
        settle(&cache);
        TIMED
    } else {
        (capacity / PER_RECORD / 2).clamp(1, TIMED)
    };
    let mut elapsed = Duration::ZERO;
    let mut done = 0;
    while done < TIMED {
        if !full {
            cache = make();
        }
        let n = batch.min(TIMED - done);
        let start = Instant::now();
        write(&cache, 10_000_000 + done, 10_000_000 + done + n);
        elapsed += start.elapsed();
        done += n;
    }
    elapsed.as_nanos() as f64 / TIMED as f64
}

/// The memory store: a claim and a completion per record.
fn store_round(rt: &tokio::runtime::Runtime, capacity: u64, full: bool) -> f64 {
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let make = || MemoryStore::builder().max_bytes(capacity).build();
    let write = |store: &MemoryStore, from: u64, to: u64| {
        rt.block_on(async {
            for i in from..to {
                let key = format!("tenant-{:08}|POST|/payments|{i:032}", i % 1000);
                let ClaimOutcome::Claimed(token) =
                    store.claim(&key, Duration::from_secs(60)).await.unwrap()
                else {
                    unreachable!("fresh key")
                };
                let record = Record::new(Some(i as u128), payload.clone());
                let ttl = Duration::from_secs(3600);
                store.complete(&key, &token, record, ttl).await.unwrap();
            }
        })
    };
    round(capacity, full, make, write, |store| {
        store.record_count();
    })
}

/// moka alone: inserts of fresh 64-bit keys with the store's eviction policy, weigher and
/// per-entry expiry.
fn moka_round(capacity: u64, full: bool) -> f64 {
    #[derive(Clone)]
    struct Value(#[allow(dead_code)] Bytes);
    struct Expiry;
    impl moka::Expiry<u64, Value> for Expiry {
        fn expire_after_create(&self, _: &u64, _: &Value, _: Instant) -> Option<Duration> {
            Some(Duration::from_secs(3600))
        }
    }
    type Cache = moka::sync::Cache<u64, Value, ahash::RandomState>;
    let make = || -> Cache {
        moka::sync::Cache::builder()
            .max_capacity(capacity)
            .initial_capacity(((capacity / 1536) as usize).min(1 << 16))
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .weigher(|_: &u64, _: &Value| PER_RECORD as u32)
            .expire_after(Expiry)
            .build_with_hasher(ahash::RandomState::new())
    };
    let write = |cache: &Cache, from: u64, to: u64| {
        for i in from..to {
            cache.insert(i, Value(Bytes::from(vec![b'x'; PAYLOAD])));
        }
    };
    round(capacity, full, make, write, Cache::run_pending_tasks)
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
