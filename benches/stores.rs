//! Store round trips: claim + complete of a fresh key, and the claim that finds the record (a
//! replay), for each store. Redis and PostgreSQL run when a server can be started or is named
//! by `REDIS_URL` / `DATABASE_URL` (the same rules as their tests); otherwise they say so.
//! SQLite runs on a temporary file with each durability setting, and with its replay cache off
//! (`sqlite-nocache/replay`: a replay that reads the file); `sqlite_dispatch` compares the
//! two ways of keeping SQLite off the async runtime on the same read.

mod fleet;
#[path = "../tests/it/support/servers.rs"]
mod servers;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tower_idempotency::store::{
    ClaimOutcome, MemoryStore, Record, SqliteStore, Store, Synchronous,
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
    let dir = servers::TempDir::new("bench-sqlite");
    for (name, synchronous, cache) in [
        ("sqlite-normal", Synchronous::Normal, 16 << 20),
        ("sqlite-full", Synchronous::Full, 16 << 20),
        ("sqlite-nocache", Synchronous::Normal, 0),
    ] {
        let store = SqliteStore::builder(dir.path().join(format!("{name}.db")))
            .synchronous(synchronous)
            .replay_cache_bytes(cache);
        bench_store(c, &rt, name, rt.block_on(store.open()).unwrap());
    }
    sqlite_dispatch(c, &rt, &dir.path().join("dispatch.db"));
    let (redis, postgres) = fleet::fleet_stores(&rt, "store");
    if let Some(store) = redis {
        bench_store(c, &rt, "redis", store);
    }
    if let Some(store) = postgres {
        bench_store(c, &rt, "postgres", store);
    }
}

/// One indexed read of a live row, dispatched the store's way (its connection's own thread,
/// reached by a channel; `inspect` is that read and nothing else) and the other usual way
/// (`spawn_blocking` on a connection behind a mutex).
fn sqlite_dispatch(c: &mut Criterion, rt: &tokio::runtime::Runtime, path: &std::path::Path) {
    use std::sync::{Arc, Mutex};
    let store = rt.block_on(SqliteStore::open(path)).unwrap();
    rt.block_on(async {
        let ClaimOutcome::Claimed(token) = store.claim("k", LEASE).await.unwrap() else {
            panic!()
        };
        store
            .complete("k", &token, Record::new(Some(1), payload()), TTL)
            .await
            .unwrap();
    });
    let connection = Arc::new(Mutex::new(rusqlite::Connection::open(path).unwrap()));
    const READ: &str = "SELECT completed, fingerprint, payload, expires_at - \
        CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) \
        FROM idempotency_records WHERE key = ?1 \
        AND expires_at > CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";
    let mut group = c.benchmark_group("sqlite_dispatch");
    group.bench_function("dedicated_thread", |b| {
        b.to_async(rt)
            .iter(|| async { store.inspect("k").await.unwrap() })
    });
    group.bench_function("spawn_blocking", |b| {
        b.to_async(rt).iter(|| {
            let connection = connection.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    let connection = connection.lock().unwrap();
                    let mut statement = connection.prepare_cached(READ).unwrap();
                    statement
                        .query_row(["k"], |row| {
                            Ok((
                                row.get::<_, bool>(0)?,
                                row.get::<_, Option<Vec<u8>>>(1)?,
                                row.get::<_, Option<Vec<u8>>>(2)?,
                                row.get::<_, i64>(3)?,
                            ))
                        })
                        .unwrap()
                })
                .await
                .unwrap()
            }
        })
    });
    group.finish();
}

criterion_group!(benches, stores);
criterion_main!(benches);
