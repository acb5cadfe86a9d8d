//! A keyed answer streamed while it is stored, in process: the handler's body is driven by a
//! channel the test holds, so each step (a chunk, an error, the end) happens when the test says.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IdempotencyLayer, RequestBody, Settings};

/// A response body fed by the test: each message is a chunk or the body's error; the end when
/// the sender is dropped.
struct Fed(mpsc::Receiver<Result<Bytes, String>>);

impl Body for Fed {
    type Data = Bytes;
    type Error = String;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, String>>> {
        self.0.poll_recv(cx).map(|m| m.map(|m| m.map(Frame::data)))
    }
}

type Feed = mpsc::Sender<Result<Bytes, String>>;

/// A handler answering 200 with a body the test feeds; each call hands its feed to the test.
#[derive(Clone)]
struct Handler {
    runs: Arc<AtomicUsize>,
    feeds: Arc<Mutex<VecDeque<Feed>>>,
    fed: Arc<tokio::sync::Notify>,
    /// Each run's recovery points, for a test to save from while the body streams.
    points: Arc<Mutex<Vec<tower_idempotency::RecoveryPoints>>>,
}

impl Handler {
    fn new() -> Self {
        Self {
            runs: Arc::default(),
            feeds: Arc::default(),
            fed: Arc::default(),
            points: Arc::default(),
        }
    }

    /// The feed of the next run, once it started.
    async fn feed(&self) -> Feed {
        loop {
            let notified = self.fed.notified();
            if let Some(feed) = self.feeds.lock().unwrap().pop_front() {
                return feed;
            }
            notified.await;
        }
    }
}

impl Service<Request<RequestBody<Full<Bytes>>>> for Handler {
    type Response = Response<Fed>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Response<Fed>, std::convert::Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RequestBody<Full<Bytes>>>) -> Self::Future {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if let Some(points) = request
            .extensions()
            .get::<tower_idempotency::RecoveryPoints>()
        {
            self.points.lock().unwrap().push(points.clone());
        }
        let (tx, rx) = mpsc::channel(1024);
        self.feeds.lock().unwrap().push_back(tx);
        self.fed.notify_waiters();
        let mut response = Response::new(Fed(rx));
        response
            .headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        std::future::ready(Ok(response))
    }
}

fn keyed(key: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut request = Request::post("/gen").header("idempotency-key", key);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Full::new(Bytes::from("{}"))).unwrap()
}

fn event(n: u32) -> Bytes {
    Bytes::from(format!("id: {n}\ndata: tok-{n}\n\n"))
}

fn events(from: u32, to: u32) -> Vec<u8> {
    (from..=to).flat_map(|n| event(n).to_vec()).collect()
}

type Svc = tower_idempotency::Idempotency<Handler>;

fn service(layer: IdempotencyLayer, handler: &Handler) -> Svc {
    layer.layer(handler.clone())
}

type Answered = Response<tower_idempotency::ResponseBody<Fed>>;

/// Sends the original of `key`, feeds its first event, and answers its response (the head,
/// sent before the body ends) and the feed of the rest.
async fn started(
    svc: &Svc,
    handler: &Handler,
    key: &str,
    headers: &[(&str, &str)],
) -> (Answered, Feed) {
    let call = tokio::spawn(svc.clone().oneshot(keyed(key, headers)));
    let feed = handler.feed().await;
    feed.send(Ok(event(1))).await.unwrap();
    (call.await.unwrap().unwrap(), feed)
}

/// Waits until a retry of `key` is a replay (the pump stored the record), and answers it.
async fn replayed(svc: &Svc, key: &str) -> Response<tower_idempotency::ResponseBody<Fed>> {
    for _ in 0..2000 {
        let response = svc.clone().oneshot(keyed(key, &[])).await.unwrap();
        if response.headers().contains_key("idempotent-replayed") {
            return response;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never stored");
}

#[tokio::test]
async fn the_head_and_first_chunk_arrive_before_the_body_ends() {
    let handler = Handler::new();
    let svc = service(IdempotencyLayer::new(), &handler);
    let (response, feed) = started(&svc, &handler, "k", &[]).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, event(1), "before the body ended");
    feed.send(Ok(event(2))).await.unwrap();
    drop(feed);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, event(2));
    let retry = replayed(&svc, "k").await;
    let body = retry.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, events(1, 2));
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_gone_mid_stream_leaves_the_stream_stored() {
    let handler = Handler::new();
    let svc = service(IdempotencyLayer::new(), &handler);
    let (response, feed) = started(&svc, &handler, "k", &[]).await;
    drop(response);
    for n in 2..=100 {
        feed.send(Ok(event(n))).await.unwrap();
    }
    drop(feed);
    let retry = replayed(&svc, "k").await;
    let body = retry.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, events(1, 100));
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_body_error_mid_stream_fails_the_client_and_releases_the_key() {
    let handler = Handler::new();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let settings = Settings::default().on_outcome({
        let outcomes = outcomes.clone();
        move |o| outcomes.lock().unwrap().push(o)
    });
    let svc = service(IdempotencyLayer::with_settings(settings), &handler);
    let (response, feed) = started(&svc, &handler, "k", &[]).await;
    feed.send(Err("broke".into())).await.unwrap();
    assert!(
        response.into_body().collect().await.is_err(),
        "never a clean end"
    );
    // Released: the retry runs the handler again.
    let retry = tokio::spawn(svc.clone().oneshot(keyed("k", &[])));
    let feed = handler.feed().await;
    drop(feed);
    let retry = retry.await.unwrap().unwrap();
    assert!(!retry.headers().contains_key("idempotent-replayed"));
    assert_eq!(handler.runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        outcomes.lock().unwrap()[0],
        tower_idempotency::Outcome::Released(tower_idempotency::ReleaseReason::BodyError),
        "one outcome for the streamed original, from its pump"
    );
}

#[tokio::test]
async fn past_the_bound_the_record_keeps_the_head_and_the_client_gets_every_byte() {
    let handler = Handler::new();
    let svc = service(IdempotencyLayer::new().max_stored_body(1000), &handler);
    let (response, feed) = started(&svc, &handler, "k", &[]).await;
    let reader = tokio::spawn(response.into_body().collect());
    for n in 2..=500 {
        feed.send(Ok(event(n))).await.unwrap();
    }
    drop(feed);
    let whole = reader.await.unwrap().unwrap().to_bytes();
    assert_eq!(whole, events(1, 500), "every byte, in order");
    let retry = replayed(&svc, "k").await;
    assert_eq!(retry.headers()["idempotent-body-omitted"], "true");
    assert!(retry
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .is_empty());
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_drain_waits_for_the_pump() {
    let handler = Handler::new();
    let layer = IdempotencyLayer::new();
    let drain = layer.settings().drain_handle();
    let svc = service(layer, &handler);
    let (response, feed) = started(&svc, &handler, "k", &[]).await;
    drop(response);
    let draining = tokio::spawn(async move { drain.drain(Duration::from_secs(30)).await });
    tokio::task::yield_now().await;
    assert!(!draining.is_finished(), "the pump still holds the claim");
    feed.send(Ok(event(2))).await.unwrap();
    drop(feed);
    let report = draining.await.unwrap();
    assert!(
        report.released().is_empty(),
        "the pump ended before the deadline"
    );
    let retry = svc.clone().oneshot(keyed("k", &[])).await.unwrap();
    assert_eq!(retry.status(), 503, "draining refuses new keyed requests");
}

fn joining() -> IdempotencyLayer {
    let settings = Settings::default()
        .on_conflict(tower_idempotency::OnConflict::Join(Duration::from_secs(30)));
    IdempotencyLayer::with_settings(settings)
        .scope(|parts| Some(parts.headers.get("tenant")?.to_str().ok()?.to_owned()))
}

#[tokio::test]
async fn a_joiner_gets_every_chunk_so_far_then_each_new_one_and_another_tenant_runs_its_own() {
    let handler = Handler::new();
    let svc = service(joining(), &handler);
    let key = "a{b}|c";
    let (original, feed) = started(&svc, &handler, key, &[("tenant", "acme")]).await;
    feed.send(Ok(event(2))).await.unwrap();
    let joiner = svc
        .clone()
        .oneshot(keyed(key, &[("tenant", "acme")]))
        .await
        .unwrap();
    assert_eq!(joiner.headers()["idempotent-replayed"], "true");
    assert_eq!(joiner.headers()["content-type"], "text/event-stream");
    let joined = tokio::spawn(joiner.into_body().collect());
    // Another tenant's request with the same key is its own: the handler runs for it.
    let other = tokio::spawn(svc.clone().oneshot(keyed(key, &[("tenant", "globex")])));
    drop(handler.feed().await);
    let other = other.await.unwrap().unwrap();
    assert!(!other.headers().contains_key("idempotent-replayed"));
    for n in 3..=50 {
        feed.send(Ok(event(n))).await.unwrap();
    }
    drop(feed);
    let whole = original.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(whole, events(1, 50));
    assert_eq!(joined.await.unwrap().unwrap().to_bytes(), whole);
    assert_eq!(handler.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_joiner_of_a_stream_past_the_bound_fails_and_the_original_gets_every_byte() {
    let handler = Handler::new();
    let svc = service(joining().max_stored_body(1000), &handler);
    let (original, feed) = started(&svc, &handler, "k", &[("tenant", "acme")]).await;
    let reader = tokio::spawn(original.into_body().collect());
    let joiner = svc
        .clone()
        .oneshot(keyed("k", &[("tenant", "acme")]))
        .await
        .unwrap();
    let joined = tokio::spawn(joiner.into_body().collect());
    for n in 2..=500 {
        feed.send(Ok(event(n))).await.unwrap();
    }
    drop(feed);
    assert_eq!(reader.await.unwrap().unwrap().to_bytes(), events(1, 500));
    assert!(
        joined.await.unwrap().is_err(),
        "a joiner cannot follow past what is kept"
    );
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
}

/// Serializes to nothing JSON can hold: `save_json` fails before anything is written.
struct Unserializable;

impl serde::Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("cannot be serialized"))
    }
}

/// A save that failed while the body streamed (a side effect may be recorded nowhere): a body
/// that fails then keeps the key, with 500 `#progress-unsaved`, as a run that was not streaming
/// would; no retry runs the handler again.
#[tokio::test]
async fn a_stream_that_fails_after_a_failed_save_keeps_the_key_as_progress_unsaved() {
    let handler = Handler::new();
    let svc = service(IdempotencyLayer::new(), &handler);
    let (response, feed) = started(&svc, &handler, "k", &[]).await;
    let points = handler.points.lock().unwrap()[0].clone();
    assert!(points.save_json("charged", &Unserializable).await.is_err());
    feed.send(Err("broke".into())).await.unwrap();
    assert!(response.into_body().collect().await.is_err());
    let retry = replayed(&svc, "k").await;
    assert_eq!(retry.status(), 500);
    let body = retry.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("progress-unsaved"));
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
}

/// A body whose every frame is ready when asked (a producer as fast as its reader), ending
/// after `total` events; counts what it produced.
struct Eager {
    produced: Arc<AtomicUsize>,
    total: usize,
}

impl Body for Eager {
    type Data = Bytes;
    type Error = String;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, String>>> {
        let n = self.produced.fetch_add(1, Ordering::SeqCst) + 1;
        if n > self.total {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(Frame::data(event(n as u32)))))
    }
}

/// A stream whose frames are always ready is a stream all the same: its first events reach the
/// client after a few frames, not once all 100,000 were produced (2.3 MB, under the stored
/// bound), and it is stored whole.
#[tokio::test]
async fn a_stream_of_frames_always_ready_reaches_the_client_before_its_end() {
    let produced = Arc::new(AtomicUsize::new(0));
    let handler = {
        let produced = produced.clone();
        tower::service_fn(move |_: Request<RequestBody<Full<Bytes>>>| {
            let body = Eager {
                produced: produced.clone(),
                total: 100_000,
            };
            async move { Ok::<_, std::convert::Infallible>(Response::new(body)) }
        })
    };
    let svc = IdempotencyLayer::new().layer(handler);
    let response = svc.clone().oneshot(keyed("eager", &[])).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, event(1));
    let at_first = produced.load(Ordering::SeqCst);
    assert!(
        at_first < 100_000,
        "the first event came once {at_first} were produced: after the whole body"
    );
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!([first, rest].concat(), events(1, 100_000));
    let replay = svc.oneshot(keyed("eager", &[])).await.unwrap();
    assert!(replay.headers().contains_key("idempotent-replayed"));
    let replayed = replay.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(replayed, events(1, 100_000));
}

type OnSqlite = tower_idempotency::Idempotency<Handler, tower_idempotency::store::SqliteStore>;

/// Two layers (two instances) on one SQLite file, joining with a short wait bound, storing
/// bodies up to `bound`, around `handler`; the store, for the test to read and write.
async fn two_instances_on_sqlite(
    dir: &crate::support::servers::TempDir,
    handler: &Handler,
    bound: usize,
) -> (tower_idempotency::store::SqliteStore, OnSqlite, OnSqlite) {
    use tower_idempotency::store::SqliteStore;
    let path = dir.path().join("live.db");
    let layer = |store| {
        let settings = Settings::new(store).on_conflict(tower_idempotency::OnConflict::Join(
            Duration::from_millis(200),
        ));
        IdempotencyLayer::with_settings(settings)
            .max_stored_body(bound)
            .layer(handler.clone())
    };
    let store = SqliteStore::open(&path).await.unwrap();
    let a = layer(store.clone());
    let b = layer(SqliteStore::open(&path).await.unwrap());
    (store, a, b)
}

/// A stream's chunk 0 (its head) damaged in the store: a joiner on another instance is
/// answered 500 `#unreadable-record` (every cut, every flipped byte, another thing), never a
/// head or a body made of the damaged bytes, and the handler does not run for it.
#[tokio::test]
async fn a_damaged_head_in_the_store_is_never_joined() {
    use tower_idempotency::store::{ClaimOutcome, Store};
    let dir = crate::support::servers::TempDir::new("live-damaged-head");
    let handler = Handler::new();
    let (store, a, b) = two_instances_on_sqlite(&dir, &handler, 1 << 20).await;
    let store_key =
        |key: &str| tower_idempotency::admin::http_key("", &http::Method::POST, "/gen", key);
    // An intact stream is joined from the other instance: its chunk 0 is what is damaged below.
    let call = tokio::spawn(a.clone().oneshot(keyed("intact", &[])));
    let feed = handler.feed().await;
    feed.send(Ok(event(1))).await.unwrap();
    let original = call.await.unwrap().unwrap();
    let head = in_the_store(&store, &store_key("intact")).await;
    let joiner = b.clone().oneshot(keyed("intact", &[])).await.unwrap();
    assert_eq!(joiner.headers()["idempotent-replayed"], "true");
    feed.send(Ok(event(2))).await.unwrap();
    drop(feed);
    let whole = original.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(whole, events(1, 2));
    assert_eq!(
        joiner.into_body().collect().await.unwrap().to_bytes(),
        whole
    );
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);

    let mut damaged: Vec<Vec<u8>> = vec![b"garbage".to_vec()];
    damaged.extend((1..head.len()).map(|cut| head[..cut].to_vec()));
    for at in 0..head.len() {
        let mut flipped = head.to_vec();
        flipped[at] ^= 0x01;
        damaged.push(flipped);
    }
    for (n, chunk) in damaged.into_iter().enumerate() {
        let key = format!("damaged-{n}");
        let raw_key = store_key(&key);
        let claimed = store.claim(&raw_key, Duration::from_secs(60));
        let ClaimOutcome::Claimed(token) = claimed.await.unwrap() else {
            panic!("a fresh key");
        };
        let chunks = [Bytes::from(chunk)];
        let ttl = Duration::from_secs(60);
        let appended = store.append_stream(&raw_key, &token, 0, &chunks, ttl);
        appended.await.unwrap();
        let response = b.clone().oneshot(keyed(&key, &[])).await.unwrap();
        assert!(
            !response.headers().contains_key("idempotent-replayed"),
            "{key}: never joined"
        );
        let status = response.status();
        assert_eq!(status, 500, "{key}: #unreadable-record");
    }
    assert_eq!(
        handler.runs.load(Ordering::SeqCst),
        1,
        "never ran for a damaged stream"
    );
}

/// Chunk 0 of `store_key`'s live stream, once the original appended it (the store gives no
/// signal: polled).
async fn in_the_store(store: &tower_idempotency::store::SqliteStore, store_key: &str) -> Bytes {
    use tower_idempotency::store::{Store, StreamRead};
    loop {
        if let StreamRead::Live(chunks) = store.read_stream(store_key, 0).await.unwrap() {
            if let Some(head) = chunks.first() {
                return head.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A stream that goes past `max_stored_body`, joined from another instance: the original's
/// client gets every byte, the joiner's body fails (the record keeps no body to end it with),
/// never a clean end with a cut body.
#[tokio::test]
async fn a_joiner_on_another_instance_of_a_stream_past_the_bound_fails() {
    let dir = crate::support::servers::TempDir::new("live-past-bound");
    let handler = Handler::new();
    let (store, a, b) = two_instances_on_sqlite(&dir, &handler, 1000).await;
    let store_key = tower_idempotency::admin::http_key("", &http::Method::POST, "/gen", "k");
    let call = tokio::spawn(a.clone().oneshot(keyed("k", &[])));
    let feed = handler.feed().await;
    feed.send(Ok(event(1))).await.unwrap();
    let original = call.await.unwrap().unwrap();
    let reader = tokio::spawn(original.into_body().collect());
    in_the_store(&store, &store_key).await;
    let joiner = b.clone().oneshot(keyed("k", &[])).await.unwrap();
    assert_eq!(joiner.headers()["idempotent-replayed"], "true");
    let joined = tokio::spawn(joiner.into_body().collect());
    for n in 2..=200 {
        feed.send(Ok(event(n))).await.unwrap();
    }
    drop(feed);
    let whole = reader.await.unwrap().unwrap().to_bytes();
    assert_eq!(
        whole,
        events(1, 200),
        "the original's client gets every byte"
    );
    assert!(
        joined.await.unwrap().is_err(),
        "the joiner fails past the bound"
    );
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
}
