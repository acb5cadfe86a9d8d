//! What a completed record costs the memory store beyond its key and payload, measured with a
//! counting allocator (dhat) over many records: `cargo bench --bench record_overhead`.

use std::time::Duration;

use bytes::Bytes;
use tower_idempotency::store::{ClaimOutcome, MemoryStore, Record, Store};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const RECORDS: usize = 50_000;
const KEY_LEN: usize = 64;
const PAYLOAD: usize = 1024;

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = MemoryStore::builder().max_bytes(1 << 40).build();
    let keys: Vec<String> = (0..RECORDS)
        .map(|i| format!("{i:0>width$}", width = KEY_LEN))
        .collect();
    // Payloads are allocated before the measurement: they are the caller's bytes, shared by the store.
    let payloads: Vec<Bytes> = (0..RECORDS)
        .map(|_| Bytes::from(vec![b'x'; PAYLOAD]))
        .collect();
    store.record_count(); // let moka allocate its structures before the baseline
    let before = dhat::HeapStats::get().curr_bytes;
    rt.block_on(async {
        for (key, payload) in keys.iter().zip(&payloads) {
            let ClaimOutcome::Claimed(token) =
                store.claim(key, Duration::from_secs(60)).await.unwrap()
            else {
                unreachable!()
            };
            store
                .complete(
                    key,
                    &token,
                    Record::new(Some(1), payload.clone()),
                    Duration::from_secs(3600),
                )
                .await
                .unwrap();
        }
    });
    assert_eq!(store.record_count(), RECORDS as u64);
    let after = dhat::HeapStats::get().curr_bytes;
    let per_record = (after - before) as f64 / RECORDS as f64;
    let key_bytes = KEY_LEN as f64;
    println!("records: {RECORDS}, key: {KEY_LEN} B, payload: {PAYLOAD} B (shared with the caller, not copied)");
    println!("heap growth per record: {per_record:.0} B");
    println!("  of which the key copy: {key_bytes:.0} B");
    println!(
        "overhead beyond key and payload: {:.0} B per record",
        per_record - key_bytes
    );
    drop(payloads);

    // The floor: the same moka configuration (keyed by a 64-bit hash, as the store is) holding
    // nothing but unit values.
    let cache: moka::sync::Cache<u64, ()> = moka::sync::Cache::builder()
        .max_capacity(1 << 40)
        .eviction_policy(moka::policy::EvictionPolicy::lru())
        .weigher(|_: &u64, _: &()| 1)
        .expire_after(NoExpiry)
        .build();
    cache.run_pending_tasks();
    let before = dhat::HeapStats::get().curr_bytes;
    for slot in 0..RECORDS as u64 {
        cache.insert(slot, ());
    }
    cache.run_pending_tasks();
    let after = dhat::HeapStats::get().curr_bytes;
    let moka_only = (after - before) as f64 / RECORDS as f64;
    println!("of which moka's own bookkeeping (same configuration, unit values): {moka_only:.0} B per entry");
}

struct NoExpiry;

impl moka::Expiry<u64, ()> for NoExpiry {
    fn expire_after_create(&self, _: &u64, _: &(), _: std::time::Instant) -> Option<Duration> {
        Some(Duration::from_secs(3600))
    }
}
