//! Store round trips: claim + complete of a fresh key, and the claim that finds the record (a
//! replay), for each store. Redis and PostgreSQL run when a server can be started or is named
//! by `REDIS_URL` / `DATABASE_URL` (the same rules as their tests); otherwise they say so.

#[path = "../tests/support/servers.rs"]
mod servers;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tower_idempotency::store::{
    ClaimOutcome, MemoryStore, PostgresStore, Record, RedisStore, Store,
};

const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(3600);

fn payload() -> bytes::Bytes {
    bytes::Bytes::from(vec![b'x'; 1024])
}

fn bench_store<St: Store>(c: &mut Criterion, rt: &tokio::runtime::Runtime, name: &str, store: St) {
    let mut group = c.benchmark_group("store");
    let counter = AtomicU64::new(0);
    let run = fastrand_seed();
    // One payload, shared (a `Bytes` clone): the store's own work is measured, not an allocation.
    let shared = payload();
    group.bench_function(format!("{name}/claim_complete"), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (store, counter, shared) = (&store, &counter, &shared);
            async move {
                let started = Instant::now();
                for _ in 0..iters {
                    let key = format!("bench/{run}/{}", counter.fetch_add(1, Ordering::Relaxed));
                    let ClaimOutcome::Claimed(token) = store.claim(&key, LEASE).await.unwrap()
                    else {
                        panic!("fresh key")
                    };
                    store
                        .complete(&key, &token, Record::new(Some(1), shared.clone()), TTL)
                        .await
                        .unwrap();
                }
                started.elapsed()
            }
        })
    });
    let replay_key = format!("bench/{run}/replayed");
    rt.block_on(async {
        let ClaimOutcome::Claimed(token) = store.claim(&replay_key, LEASE).await.unwrap() else {
            panic!()
        };
        store
            .complete(
                &replay_key,
                &token,
                Record::new(Some(1), shared.clone()),
                TTL,
            )
            .await
            .unwrap();
    });
    group.bench_function(format!("{name}/replay"), |b| {
        b.to_async(rt).iter(|| async {
            match store.claim(&replay_key, LEASE).await.unwrap() {
                ClaimOutcome::Completed(record) => record,
                other => panic!("{other:?}"),
            }
        })
    });
    group.finish();
}

fn fastrand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn stores(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    bench_store(c, &rt, "memory", MemoryStore::new());
    // Benchmarks skip rather than fail when a server is missing, even under CI.
    std::env::remove_var("CI");
    match servers::redis_url() {
        Some(url) => {
            let store = rt.block_on(RedisStore::connect(&url)).unwrap();
            bench_store(c, &rt, "redis", store);
        }
        None => eprintln!("store/redis: skipped, no redis-server and no REDIS_URL"),
    }
    match servers::postgres_url() {
        Some(url) => {
            let store = rt.block_on(async {
                let store = PostgresStore::connect(&url).await.unwrap();
                store.migrate().await.unwrap();
                store
            });
            bench_store(c, &rt, "postgres", store);
        }
        None => eprintln!("store/postgres: skipped, no PostgreSQL and no DATABASE_URL"),
    }
}

criterion_group!(benches, stores);
criterion_main!(benches);
