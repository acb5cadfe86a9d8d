//! Messages per second through the consumer layer on each store, next to the bare consumer
//! loop (the same handler called directly), in one run: fresh messages (claim, handle, store
//! the outcome) and redeliveries (the stored outcome, handler not run), one at a time (a
//! partition's loop) and 32 at a time (a consumer with 32 deliveries in flight).
//!
//! Redis and PostgreSQL run when a server can be started or is named by `REDIS_URL` /
//! `DATABASE_URL` (the same rules as the tests); otherwise they say so.

mod fleet;
#[path = "../tests/it/support/servers.rs"]
mod servers;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use criterion::{criterion_group, Criterion, Throughput};
use serde::{Deserialize, Serialize};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_idempotency::consumer::{Delivery, IdempotentConsumerLayer};
use tower_idempotency::store::{MemoryStore, SqliteStore, Store};

/// A payment event, as a broker would deliver it.
#[derive(Clone)]
struct Event {
    id: String,
    amount: u64,
}

/// The handler's outcome, stored as JSON.
#[derive(Serialize, Deserialize)]
struct Charged {
    charge: String,
    amount: u64,
}

async fn handle(event: Event) -> Result<Charged, Infallible> {
    Ok(Charged {
        charge: format!("ch_{}", event.id),
        amount: event.amount,
    })
}

const IN_FLIGHT: u64 = 32;

fn run_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn bare(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let mut group = c.benchmark_group("consumer");
    group.throughput(Throughput::Elements(1));
    let handler = service_fn(handle);
    group.bench_function("bare/one_at_a_time", |b| {
        b.to_async(rt).iter(|| {
            let event = Event {
                id: "evt".into(),
                amount: 1,
            };
            handler.oneshot(event)
        })
    });
    group.finish();
}

fn bench_store<St: Store + Clone>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    store: St,
) {
    let mut group = c.benchmark_group("consumer");
    group.throughput(Throughput::Elements(1));
    let layer = IdempotentConsumerLayer::with_store(|event: &Event| event.id.clone(), store);
    let consumer = layer.layer(service_fn(handle));
    let (run, counter) = (run_id(), AtomicU64::new(0));
    let fresh = || Event {
        id: format!("evt/{run}/{}", counter.fetch_add(1, Ordering::Relaxed)),
        amount: 1,
    };
    group.bench_function(format!("{name}/fresh/one_at_a_time"), |b| {
        b.to_async(rt).iter(|| async {
            match consumer.clone().oneshot(fresh()).await {
                Ok(Delivery::Processed(_)) => {}
                _ => panic!("a fresh message is processed"),
            }
        })
    });
    group.bench_function(format!("{name}/fresh/{IN_FLIGHT}_in_flight"), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (consumer, fresh) = (&consumer, &fresh);
            async move { in_flight(consumer, iters, fresh).await }
        })
    });
    let redelivered = fresh();
    rt.block_on(consumer.clone().oneshot(redelivered.clone()))
        .unwrap();
    group.bench_function(format!("{name}/redelivery/one_at_a_time"), |b| {
        b.to_async(rt).iter(|| async {
            match consumer.clone().oneshot(redelivered.clone()).await {
                Ok(Delivery::Duplicate(_)) => {}
                _ => panic!("a redelivery is a duplicate"),
            }
        })
    });
    group.finish();
}

/// `iters` deliveries, `IN_FLIGHT` at a time; the time they took.
async fn in_flight<S>(consumer: &S, iters: u64, fresh: &dyn Fn() -> Event) -> std::time::Duration
where
    S: Service<Event> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: std::fmt::Debug + Send,
{
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..iters {
        if tasks.len() as u64 >= IN_FLIGHT {
            tasks.join_next().await.unwrap().unwrap();
        }
        let (consumer, event) = (consumer.clone(), fresh());
        tasks.spawn(async move { consumer.oneshot(event).await.unwrap() });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    started.elapsed()
}

fn consumers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    bare(c, &rt);
    bench_store(c, &rt, "memory", MemoryStore::new());
    let dir = servers::TempDir::new("bench-consumer");
    let sqlite = rt.block_on(SqliteStore::open(dir.path().join("consumer.db")));
    bench_store(c, &rt, "sqlite", sqlite.unwrap());
    let (redis, postgres) = fleet::fleet_stores(&rt, "consumer");
    if let Some(store) = redis {
        bench_store(c, &rt, "redis", store);
    }
    if let Some(store) = postgres {
        bench_store(c, &rt, "postgres", store);
    }
}

criterion_group!(benches, consumers);

fn main() {
    if let Ok(spec) = std::env::var("CONSUMER_COUNT") {
        return count(&spec);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

/// Counting mode, for cachegrind (as `benches/instructions.sh` counts the HTTP layer):
/// `CONSUMER_COUNT=PATH:N` delivers N messages on one path, on the memory store, and exits;
/// two counts' difference over their difference in N is what one message costs. Paths: `bare`
/// (the handler called directly), `fresh`, `redelivery`.
fn count(spec: &str) {
    let (path, n) = spec.split_once(':').expect("CONSUMER_COUNT=PATH:N");
    let n: u64 = n.parse().expect("N messages");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let layer =
        IdempotentConsumerLayer::with_store(|event: &Event| event.id.clone(), MemoryStore::new());
    let mut consumer = layer.layer(service_fn(handle));
    let event = |i: u64| Event {
        id: format!("evt/{i}"),
        amount: 1,
    };
    assert!(
        matches!(path, "bare" | "fresh" | "redelivery"),
        "unknown path {path}"
    );
    rt.block_on(async {
        for i in 0..n {
            let event = event(if path == "redelivery" { 0 } else { i });
            if path == "bare" {
                drop(std::hint::black_box(handle(event).await));
                continue;
            }
            let delivered = consumer.ready().await.unwrap().call(event).await;
            drop(std::hint::black_box(delivered.unwrap()));
        }
    });
}
