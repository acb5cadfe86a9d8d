//! What the layer adds to a request, in process, next to the bare handler measured in the
//! same run; and how replays and claims scale with tasks on a multi-threaded runtime.

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_idempotency::{IdempotencyLayer, RequestBody};

#[path = "driven.rs"]
mod driven;
use driven::{drive, payload, request, Handler};

/// Fills the default 64 MiB store behind `service` with three times what it holds (fresh keys
/// numbered from 2^50), so that every later fresh record evicts one.
async fn fill<S, B>(service: &mut S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let capacity_records = 64 * 1024 * 1024 / 1800;
    for n in 0..3 * capacity_records {
        drive(service, request("idempotency-key", (1 << 50) + n)).await;
    }
}

/// Times `iters` sequential requests made by `make` (given the iteration number).
fn bench_requests<S, B>(
    b: &mut criterion::Bencher<'_>,
    rt: &tokio::runtime::Runtime,
    service: S,
    make: impl Fn(u64) -> Request<Full<Bytes>> + Clone,
) where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    b.to_async(rt).iter_custom(|iters| {
        let (mut service, make) = (service.clone(), make.clone());
        async move {
            let started = Instant::now();
            for n in 0..iters {
                std::hint::black_box(drive(&mut service, make(n)).await);
            }
            started.elapsed()
        }
    })
}

fn overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("layer");
    let handler = Handler(payload());
    let layered = || tower::Layer::layer(&IdempotencyLayer::new(), handler.clone());
    let counter = Arc::new(AtomicU64::new(1 << 40));

    group.bench_function("bare_handler", |b| {
        bench_requests(b, &rt, handler.clone(), |n| request("x-other", n))
    });
    // Passthrough: the same request without an idempotency key.
    group.bench_function("passthrough_no_key", |b| {
        bench_requests(b, &rt, layered(), |n| request("x-other", n))
    });
    // First request: a fresh key each time (claim, run, store), on a store that is never
    // full: a new one every 4,096 requests (made outside the timed part).
    let fresh = counter.clone();
    group.bench_function("first_request_fresh_key", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let fresh = fresh.clone();
            async move {
                let mut timed = Duration::ZERO;
                let mut service = layered();
                for n in 0..iters {
                    if n % 4096 == 0 {
                        service = layered();
                    }
                    let request = request("idempotency-key", fresh.fetch_add(1, Ordering::Relaxed));
                    let started = Instant::now();
                    std::hint::black_box(drive(&mut service, request).await);
                    timed += started.elapsed();
                }
                timed
            }
        })
    });
    // First request on a store that is full: the steady state of a busy service, where every
    // new record evicts the least recently used one (the default 64 MiB store, prefilled with
    // three times what it holds).
    let full_store = tower_idempotency::store::MemoryStore::new();
    {
        let mut service = tower::Layer::layer(
            &IdempotencyLayer::with_store(full_store.clone()),
            handler.clone(),
        );
        rt.block_on(fill(&mut service));
        eprintln!(
            "full store: {} records, {} bytes charged",
            full_store.record_count(),
            full_store.weighted_size()
        );
    }
    let full = counter.clone();
    group.bench_function("first_request_fresh_key_full_store", |b| {
        let full = full.clone();
        let service = tower::Layer::layer(
            &IdempotencyLayer::with_store(full_store.clone()),
            handler.clone(),
        );
        bench_requests(b, &rt, service, move |_| {
            request("idempotency-key", full.fetch_add(1, Ordering::Relaxed))
        })
    });
    // Duplicate: the same key every time (replay).
    group.bench_function("replay", |b| {
        let mut service = layered();
        rt.block_on(drive(&mut service, request("idempotency-key", 1)));
        bench_requests(b, &rt, service, |_| request("idempotency-key", 1))
    });
    // Duplicate on a store that keeps no decoded form (`MemoryStoreBuilder::keep_decoded`
    // off): every replay decodes the stored bytes.
    let decoding = || {
        let store = tower_idempotency::store::MemoryStore::builder()
            .keep_decoded(false)
            .build();
        tower::Layer::layer(&IdempotencyLayer::with_store(store), handler.clone())
    };
    group.bench_function("replay_decoding", |b| {
        let mut service = decoding();
        rt.block_on(drive(&mut service, request("idempotency-key", 1)));
        bench_requests(b, &rt, service, |_| request("idempotency-key", 1))
    });
    // Mismatch: the same key with another body (422).
    group.bench_function("mismatch_422", |b| {
        let mut service = layered();
        rt.block_on(drive(&mut service, request("idempotency-key", 1)));
        bench_requests(b, &rt, service, |_| {
            let mut other = request("idempotency-key", 1);
            *other.body_mut() =
                Full::new(Bytes::from_static(br#"{"amount":9999,"currency":"usd"}"#));
            other
        })
    });
    group.finish();
}

/// `tasks` tasks each sending `per_task` requests made by `make`, all at once.
async fn burst<S>(
    service: &S,
    tasks: usize,
    per_task: u64,
    make: impl Fn(usize, u64) -> Request<Full<Bytes>> + Clone + Send + 'static,
) -> Duration
where
    S: Service<Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Response: Send,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(tasks + 1));
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (mut service, barrier, make) = (service.clone(), barrier.clone(), make.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                for i in 0..per_task {
                    let _ = service
                        .ready()
                        .await
                        .unwrap()
                        .call(make(t, i))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    barrier.wait().await;
    let started = Instant::now();
    for handle in handles {
        handle.await.unwrap();
    }
    started.elapsed()
}

fn contention(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("contention");
    group.sample_size(20);
    const PER_TASK: u64 = 200;
    let handler = Handler(payload());
    let epoch = Arc::new(AtomicU64::new(0));
    for tasks in [1usize, 2, 4, 16, 64] {
        group.throughput(Throughput::Elements(tasks as u64 * PER_TASK));
        group.bench_with_input(
            BenchmarkId::new("bare_handler", tasks),
            &tasks,
            |b, &tasks| {
                let service = handler.clone();
                b.to_async(&rt).iter_custom(|iters| {
                    let service = service.clone();
                    async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            total += burst(&service, tasks, PER_TASK, |_, i| request("x-other", i))
                                .await;
                        }
                        total
                    }
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("replay_same_key", tasks),
            &tasks,
            |b, &tasks| {
                let service = tower::Layer::layer(&IdempotencyLayer::new(), handler.clone());
                rt.block_on(drive(&mut service.clone(), request("idempotency-key", 1)));
                b.to_async(&rt).iter_custom(|iters| {
                    let service = service.clone();
                    async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            total += burst(&service, tasks, PER_TASK, |_, _| {
                                request("idempotency-key", 1)
                            })
                            .await;
                        }
                        total
                    }
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("claim_distinct_keys", tasks),
            &tasks,
            |b, &tasks| {
                let service = tower::Layer::layer(&IdempotencyLayer::new(), handler.clone());
                let epoch = epoch.clone();
                b.to_async(&rt).iter_custom(move |iters| {
                    let (service, epoch) = (service.clone(), epoch.clone());
                    async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let run = epoch.fetch_add(1, Ordering::Relaxed) << 32;
                            total += burst(&service, tasks, PER_TASK, move |t, i| {
                                request("idempotency-key", run | (t as u64) << 16 | i)
                            })
                            .await;
                        }
                        total
                    }
                })
            },
        );
    }
    group.finish();
}

// `RequestBody` is what the handler receives behind the layer; named here so that a change
// of the handler's request type shows up in this file.
#[allow(dead_code)]
type LayeredRequest = Request<RequestBody<Full<Bytes>>>;

/// Counting mode, for `benches/instructions.sh`: `LAYER_COUNT=PATH:N` sends N requests of one
/// path (after its set-up) and exits, so that the script can run it under cachegrind twice
/// and divide the difference by the requests: instructions per request, which, unlike time,
/// a shared machine's noise does not move.
fn count(spec: &str) {
    let (path, n) = spec.split_once(':').expect("LAYER_COUNT=PATH:N");
    let n: u64 = n.parse().expect("N requests");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handler = Handler(payload());
    let layered = || tower::Layer::layer(&IdempotencyLayer::new(), handler.clone());
    rt.block_on(async {
        match path {
            "bare_handler" => {
                let mut service = handler.clone();
                for i in 0..n {
                    drive(&mut service, request("x-other", i)).await;
                }
            }
            "passthrough_no_key" => {
                let mut service = layered();
                for i in 0..n {
                    drive(&mut service, request("x-other", i)).await;
                }
            }
            "first_request_fresh_key" => {
                let mut service = layered();
                keyed(&mut service, true, n).await;
            }
            "first_request_fresh_key_full_store" => {
                // As in the criterion bench: every fresh record evicts one.
                let mut service = layered();
                fill(&mut service).await;
                keyed(&mut service, true, n).await;
            }
            "replay" => {
                let mut service = layered();
                keyed(&mut service, false, n).await;
            }
            // `replay_kept_decoded`: a store that keeps records decoded (`keep_decoded(true)`;
            // off by default since issue 42, so `replay` decodes every time like
            // `replay_decoding`).
            "replay_kept_decoded" | "replay_decoding" => {
                let store = tower_idempotency::store::MemoryStore::builder()
                    .keep_decoded(path == "replay_kept_decoded")
                    .build();
                let mut service =
                    tower::Layer::layer(&IdempotencyLayer::with_store(store), handler.clone());
                keyed(&mut service, false, n).await;
            }
            // The memory store behind a `BoxStore`, as the demo (and any service that picks its
            // store at run time) runs it: each store call through a boxed future.
            "boxed_replay" | "boxed_fresh" => {
                let store = tower_idempotency::store::BoxStore::new(
                    tower_idempotency::store::MemoryStore::new(),
                );
                let mut service =
                    tower::Layer::layer(&IdempotencyLayer::with_store(store), handler.clone());
                keyed(&mut service, path == "boxed_fresh", n).await;
            }
            // The same two paths on a Redis store (`REDIS_URL`, a server of the caller's): the
            // layer's work around the store's round trips, the client's included, in
            // instructions (a server's work is in another process, and waiting costs none).
            "redis_replay" | "redis_fresh" => {
                let url = std::env::var("REDIS_URL").expect("REDIS_URL for the redis_ paths");
                let store = tower_idempotency::store::RedisStore::connect(&url)
                    .await
                    .expect("Redis at REDIS_URL")
                    .with_prefix(format!("layer-count-{}:", std::process::id()));
                let mut service =
                    tower::Layer::layer(&IdempotencyLayer::with_store(store), handler.clone());
                keyed(&mut service, path == "redis_fresh", n).await;
            }
            // Their limit, as the demo's limit routes (`examples/demo_server/limit.rs`): the
            // bare handler with only the raw round trips (a replay: `GET`, answered with the
            // bytes read; a fresh key: `SET NX PX`, the handler, its body read whole, `SET PX`)
            // on one multiplexed connection, as `redis_replay` and `redis_fresh` send.
            "redis_limit_replay" | "redis_limit_fresh" => {
                let url = std::env::var("REDIS_URL").expect("REDIS_URL for the redis_ paths");
                let client = redis::Client::open(url.as_str()).expect("a Redis URL");
                let connection = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("Redis at REDIS_URL");
                let prefix = format!("layer-limit-{}:", std::process::id());
                let fresh = path == "redis_limit_fresh";
                let handler = handler.clone();
                let mut service = tower::service_fn(move |request: Request<Full<Bytes>>| {
                    let (mut connection, mut handler) = (connection.clone(), handler.clone());
                    let key = format!(
                        "{prefix}{}",
                        request.headers()["idempotency-key"].to_str().unwrap()
                    );
                    async move {
                        if !fresh {
                            let stored: Option<Vec<u8>> = redis::cmd("GET")
                                .arg(&key)
                                .query_async(&mut connection)
                                .await
                                .unwrap();
                            if let Some(stored) = stored {
                                let mut response = Response::new(Full::new(Bytes::from(stored)));
                                response.headers_mut().insert(
                                    "content-type",
                                    HeaderValue::from_static("application/json"),
                                );
                                return Ok::<_, Infallible>(response);
                            }
                        }
                        let _: Option<String> = redis::cmd("SET")
                            .arg(&key)
                            .arg("c")
                            .arg("NX")
                            .arg("PX")
                            .arg(60_000)
                            .query_async(&mut connection)
                            .await
                            .unwrap();
                        let response = handler.call(request).await?;
                        let (parts, body) = response.into_parts();
                        let bytes = body.collect().await.unwrap().to_bytes();
                        let _: Option<String> = redis::cmd("SET")
                            .arg(&key)
                            .arg(bytes.as_ref())
                            .arg("PX")
                            .arg(86_400_000)
                            .query_async(&mut connection)
                            .await
                            .unwrap();
                        Ok(Response::from_parts(parts, Full::new(bytes)))
                    }
                });
                keyed(&mut service, fresh, n).await;
            }
            other => panic!("unknown path {other}"),
        }
    });
}

/// `n` keyed requests through `service`: a fresh key each (`fresh`), or one key sent `n + 1`
/// times (the first stores it, the rest replay it).
async fn keyed<S, B>(service: &mut S, fresh: bool, n: u64)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    if fresh {
        for i in 0..n {
            drive(service, request("idempotency-key", i)).await;
        }
    } else {
        for _ in 0..=n {
            drive(service, request("idempotency-key", 1)).await;
        }
    }
}

criterion_group!(benches, overhead, contention);

fn main() {
    if let Ok(spec) = std::env::var("LAYER_COUNT") {
        return count(&spec);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
