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
    drop(cache);

    through_the_layer(&rt, false);
    through_the_layer(&rt, true);
}

/// Records written and replayed by the HTTP layer: what the store charges per record (its
/// weighted size, the decoded form's estimate included), against the heap a record takes once
/// replayed (its decoded form kept).
fn through_the_layer(rt: &tokio::runtime::Runtime, keep_decoded: bool) {
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    use tower::{Service, ServiceExt};

    const REQUESTS: u64 = 20_000;
    let store = MemoryStore::builder()
        .max_bytes(1 << 40)
        .keep_decoded(keep_decoded)
        .build();
    let handler = tower::service_fn(|_request: Request<_>| async {
        let body = Bytes::from(vec![b'x'; PAYLOAD]);
        let response = Response::builder()
            .header("content-type", "application/json")
            .header("location", "/payments/pay_0123456789abcdef")
            .header("x-ratelimit-remaining", "99")
            .body(Full::new(body))
            .unwrap();
        Ok::<_, std::convert::Infallible>(response)
    });
    let mut service = tower::Layer::layer(
        &tower_idempotency::IdempotencyLayer::with_store(store.clone()),
        handler,
    );
    let request = |n: u64| {
        Request::post("/payments")
            .header("idempotency-key", format!("{n:032}"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    // Every key once: the first pass stores, the second replays.
    let mut pass = |replays: bool| {
        rt.block_on(async {
            for n in 0..REQUESTS {
                let response = service.ready().await.unwrap();
                let response = response.call(request(n)).await.unwrap();
                assert_eq!(
                    response.headers().contains_key("idempotent-replayed"),
                    replays
                );
                response.into_body().collect().await.unwrap();
            }
        })
    };
    store.record_count();
    let before = dhat::HeapStats::get().curr_bytes;
    pass(false);
    let charged = store.weighted_size() as f64 / REQUESTS as f64;
    let stored = dhat::HeapStats::get().curr_bytes;
    pass(true);
    let replayed = dhat::HeapStats::get().curr_bytes;
    let per = |bytes: f64| bytes / REQUESTS as f64;
    println!(
        "through the layer, keep_decoded({keep_decoded}) ({REQUESTS} records, {PAYLOAD} B bodies, 3 headers): charged {charged:.0} B per record; heap {:.0} B per record stored, {:.0} B once replayed (+{:.0} B)",
        per(stored as f64 - before as f64),
        per(replayed as f64 - before as f64),
        per(replayed as f64 - stored as f64),
    );
}

struct NoExpiry;

impl moka::Expiry<u64, ()> for NoExpiry {
    fn expire_after_create(&self, _: &u64, _: &(), _: std::time::Instant) -> Option<Duration> {
        Some(Duration::from_secs(3600))
    }
}
