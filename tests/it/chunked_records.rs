//! A body of many chunks is stored with its chunk boundaries on every store (record format 4:
//! a chunk table under the record's seal) and replayed byte-identical, one frame per original
//! chunk: 10 MB on memory, SQLite, Redis, Redis Cluster and PostgreSQL (real servers), and a
//! 16 MiB body, the size of a record at `max_stored_body(16 MiB)`, through each store's own
//! limits (Redis' bulk strings, PostgreSQL's `bytea`, SQLite's blobs).

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use tower::{Service, ServiceExt};
use tower_idempotency::store::{MemoryStore, PostgresStore, RedisStore, SqliteStore, Store};
use tower_idempotency::{IdempotencyLayer, RequestBody, ResponseBody};

use crate::support::servers::{postgres_url, redis_cluster_urls, redis_url, TempDir};

/// The bound the tests store under.
const MAX: usize = 16 * 1024 * 1024;

/// `total` bytes in chunks of 1 byte to 16 KiB (a fixed pseudo-random sequence), each chunk's
/// bytes different from its neighbours': a replay that moved a boundary or a byte shows it.
pub(crate) fn chunks(total: usize) -> Vec<Bytes> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = Vec::new();
    let mut left = total;
    while left > 0 {
        let len = ((next() % 16_384) as usize + 1).min(left);
        let fill = next() as u8;
        out.push(Bytes::from(
            (0..len)
                .map(|i| fill.wrapping_add(i as u8))
                .collect::<Vec<_>>(),
        ));
        left -= len;
    }
    out
}

/// A service answering keyed requests, as the tests drive it.
pub(crate) type Exports =
    tower::util::BoxCloneService<Request<Body>, Response<ResponseBody<Body>>, Infallible>;

/// A layer over `store` (bound `MAX`) around a handler answering `body` as its chunks, and
/// the handler's run count.
pub(crate) fn service<St>(store: St, body: Arc<Vec<Bytes>>) -> (Exports, Arc<AtomicUsize>)
where
    St: Store + Clone + Send + Sync + 'static,
{
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let service = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::with_store(store).max_stored_body(MAX))
        .service_fn(move |_req: Request<RequestBody<Body>>| {
            counted.fetch_add(1, Ordering::SeqCst);
            let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = body
                .iter()
                .map(|c| Ok(http_body::Frame::data(c.clone())))
                .collect();
            let stream = Body::new(StreamBody::new(futures_util::stream::iter(frames)));
            async move { Ok::<_, Infallible>(Response::new(stream)) }
        });
    (Exports::new(service), runs)
}

/// A keyed POST.
pub(crate) fn post(key: &str) -> Request<Body> {
    Request::post("/exports")
        .header("idempotency-key", key)
        .body(Body::from("{\"export\":1}"))
        .unwrap()
}

/// The data frames of a response, as the client receives them, and whether it was replayed.
pub(crate) async fn frames(response: Response<ResponseBody<Body>>) -> (Vec<Bytes>, bool) {
    let replayed = response.headers().contains_key("idempotent-replayed");
    let mut body = response.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames.push(data);
        }
    }
    (frames, replayed)
}

/// The original and two retries of a `total`-byte body of many chunks on `store`: each gets
/// every chunk as the handler made it, the retries replayed; the handler ran once.
async fn replays_with_its_chunks<St>(store: St, total: usize, what: &str)
where
    St: Store + Clone + Send + Sync + 'static,
{
    let body = Arc::new(chunks(total));
    assert!(body.len() > 1000, "{what}: many chunks");
    let (mut service, runs) = service(store, body.clone());
    let key = tower_idempotency::store::conformance::fresh_key("chunked");
    let first = service
        .ready()
        .await
        .unwrap()
        .call(post(&key))
        .await
        .unwrap();
    let (first, replayed) = frames(first).await;
    assert!(!replayed);
    assert!(first == *body, "{what}: the original's frames");
    for attempt in 0..2 {
        let retry = service
            .ready()
            .await
            .unwrap()
            .call(post(&key))
            .await
            .unwrap();
        assert_eq!(retry.status(), 200, "{what}");
        let (retry, replayed) = frames(retry).await;
        assert!(replayed, "{what}: attempt {attempt} not replayed");
        assert_eq!(
            retry.iter().map(Bytes::len).sum::<usize>(),
            total,
            "{what}: length"
        );
        assert_eq!(retry.len(), body.len(), "{what}: frame count");
        assert!(retry == *body, "{what}: the replay's frames differ");
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "{what}: the handler ran again"
    );
}

const TEN_MB: usize = 10_000_000;

#[tokio::test]
async fn ten_mb_in_chunks_replays_with_its_chunks_from_memory() {
    let store = MemoryStore::builder().max_bytes(64 << 20).build();
    replays_with_its_chunks(store.clone(), TEN_MB, "memory").await;
    // Charged to the store's capacity with its body.
    assert!(
        store.weighted_size() >= TEN_MB as u64,
        "{}",
        store.weighted_size()
    );
    let store = MemoryStore::builder().max_bytes(64 << 20).build();
    replays_with_its_chunks(store.clone(), MAX, "memory, 16 MiB").await;
    assert!(store.weighted_size() >= MAX as u64);
}

#[tokio::test]
async fn ten_mb_in_chunks_replays_with_its_chunks_from_sqlite() {
    let dir = TempDir::new("chunked-sqlite");
    // No replay cache: each retry reads the row.
    let store = SqliteStore::builder(dir.path().join("chunked.db"))
        .replay_cache_bytes(0)
        .open()
        .await
        .unwrap();
    replays_with_its_chunks(store.clone(), TEN_MB, "sqlite").await;
    replays_with_its_chunks(store, MAX, "sqlite, 16 MiB").await;
    // With the replay cache (its default size).
    let store = SqliteStore::open(dir.path().join("cached.db"))
        .await
        .unwrap();
    replays_with_its_chunks(store, TEN_MB, "sqlite, cached").await;
}

#[tokio::test]
async fn ten_mb_in_chunks_replays_with_its_chunks_from_redis() {
    let Some(url) = redis_url() else { return };
    let store = RedisStore::connect(&url).await.unwrap();
    replays_with_its_chunks(store.clone(), TEN_MB, "redis").await;
    replays_with_its_chunks(store, MAX, "redis, 16 MiB").await;
}

#[tokio::test]
async fn ten_mb_in_chunks_replays_with_its_chunks_from_a_redis_cluster() {
    let Some(urls) = redis_cluster_urls() else {
        return;
    };
    let store = RedisStore::connect_cluster(&urls).await.unwrap();
    replays_with_its_chunks(store.clone(), TEN_MB, "redis cluster").await;
    replays_with_its_chunks(store, MAX, "redis cluster, 16 MiB").await;
}

#[tokio::test]
async fn ten_mb_in_chunks_replays_with_its_chunks_from_postgres() {
    let Some(url) = postgres_url() else { return };
    let store = PostgresStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    replays_with_its_chunks(store.clone(), TEN_MB, "postgres").await;
    replays_with_its_chunks(store, MAX, "postgres, 16 MiB").await;
}
