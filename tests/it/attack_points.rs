//! Hostile tests of recovery points: each test names the documented promise it checks
//! (docs/recovery-points.md, docs/failures.md, the rustdoc of `RecoveryPoints`). A failing test
//! here is a break of that promise on the current code.

use crate::support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Extension, Router};
use support::servers::redis_url;
use support::{request, send};
use tower_idempotency::store::{MemoryStore, RedisStore, Store};
use tower_idempotency::{IdempotencyLayer, RecoveryError, RecoveryPoints, Settings};

/// What each run's handler found, in order.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, line: impl Into<String>) {
        self.0.lock().unwrap().push(line.into());
    }
    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

fn describe(
    loaded: Result<Option<tower_idempotency::store::RecoveryPoint>, RecoveryError>,
) -> String {
    match loaded {
        Ok(Some(point)) => format!(
            "{}={}",
            point.phase(),
            String::from_utf8_lossy(point.data())
        ),
        Ok(None) => "none".to_owned(),
        Err(error) => format!("load error: {error:?}"),
    }
}

/// The handler of `recovery_points.rs`, reduced: reads the body (axum `String`), loads the
/// point, saves `x-save` when asked, answers `x-status`.
fn loading_app<St: Store + Clone>(layer: IdempotencyLayer<St>, log: Log) -> support::App<St> {
    let handler =
        move |Extension(points): Extension<RecoveryPoints>, headers: HeaderMap, _body: String| {
            let log = log.clone();
            async move {
                let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
                let found = describe(points.load().await);
                let saved = match header("x-save") {
                    Some(phase) => match points.save(phase, "data").await {
                        Ok(()) => "saved".to_owned(),
                        Err(error) => format!("save error: {error:?}"),
                    },
                    None => "nothing".to_owned(),
                };
                log.push(format!("{found}; {saved}"));
                if let Some(ms) = header("x-delay-ms") {
                    tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
                }
                let status = header("x-status").map_or(201, |s| s.parse().unwrap());
                (StatusCode::from_u16(status).unwrap(), "{}")
            }
        };
    let router = Router::new()
        .route("/payments", post(handler.clone()))
        .route("/refunds", post(handler));
    tower::Layer::layer(&layer, router)
}

fn unique(case: &str) -> String {
    tower_idempotency::store::conformance::fresh_key(case).replace(['/', '{', '}', '|'], "-")
}

// ---------------------------------------------------------------------------------------------
// Promise: "A point belongs to its key and its payload. It is stored under the key's own
// (tenant, method, path, key) identity, so no other tenant or key reaches it, whatever the key's
// text (braces, `|`, prefixes of other keys: the conformance suite tries them on every store)."
// (docs/recovery-points.md, "What it guarantees")
// ---------------------------------------------------------------------------------------------

/// Two tenants, two different keys that only share a Redis hash tag (`{order}`), the same
/// (empty-object) payload. Tenant B's brand-new key must find no point; it finds tenant A's.
/// And B's completion must not delete A's point; it does.
#[tokio::test]
async fn redis_keys_sharing_a_hash_tag_never_share_a_recovery_point() {
    let Some(url) = redis_url() else { return };
    let store = RedisStore::connect(&url).await.expect("connect to redis");
    let log = Log::default();
    let layer = IdempotencyLayer::with_settings(Settings::new(store)).scope(|parts| {
        parts
            .headers
            .get("x-tenant")
            .map(|v| v.to_str().unwrap().to_owned())
    });
    let mut app = loading_app(layer, log.clone());
    let tag = unique("tag");
    let key_a = format!("{{{tag}}}-a");
    let key_b = format!("{{{tag}}}-b");
    // Tenant A charges, saves its point, fails: the point stays for A's retry.
    let failed = send(
        &mut app,
        request(
            Some(&key_a),
            "{}",
            &[
                ("x-tenant", "alice"),
                ("x-save", "charged"),
                ("x-status", "500"),
            ],
        ),
    )
    .await;
    assert_eq!(failed.status, 500);
    // Tenant B, a key never used before.
    let other = send(
        &mut app,
        request(Some(&key_b), "{}", &[("x-tenant", "mallory")]),
    )
    .await;
    assert_eq!(other.status, 201);
    // A's retry resumes from its own point.
    let retry = send(
        &mut app,
        request(Some(&key_a), "{}", &[("x-tenant", "alice")]),
    )
    .await;
    assert_eq!(retry.status, 201);
    let lines = log.lines();
    assert_eq!(
        lines,
        ["none; saved", "none; nothing", "charged=data; nothing"],
        "tenant mallory's fresh key {key_b:?} must not read (nor, by completing, delete) \
         tenant alice's point of key {key_a:?}"
    );
}

/// On a single Redis, a key whose hash-tag part holds a `}` keeps its point at
/// `<record key>:point`, which is the record key of the key `<key>:point`: one key's point
/// and another key's record are one Redis value. A fresh request with the second key must run
/// (and find no point); it does not.
#[tokio::test]
async fn redis_a_keys_point_is_never_another_keys_record() {
    let Some(url) = redis_url() else { return };
    let store = RedisStore::connect(&url).await.expect("connect to redis");
    let log = Log::default();
    let mut app = loading_app(
        IdempotencyLayer::with_settings(Settings::new(store)),
        log.clone(),
    );
    let first = format!("x{{}}}}{}", unique("brace"));
    let second = format!("{first}:point");
    let failed = send(
        &mut app,
        request(
            Some(&first),
            "{}",
            &[("x-save", "charged"), ("x-status", "500")],
        ),
    )
    .await;
    assert_eq!(failed.status, 500);
    let fresh = send(&mut app, request(Some(&second), "{}", &[])).await;
    assert_eq!(
        fresh.status,
        201,
        "key {second:?} was never used, so its request runs; got {:?}",
        String::from_utf8_lossy(&fresh.body)
    );
    assert_eq!(log.lines(), ["none; saved", "none; nothing"]);
}

// ---------------------------------------------------------------------------------------------
// Promise: "After a failed save in a run (anything but `LeaseLost` and `KeyReused`), it never
// releases the key: a 4xx or 5xx answer is stored and replayed like a success, and a panic or
// an error of the inner service is stored as 500 `#progress-unsaved`, so that no retry runs the
// work again." (docs/recovery-points.md, "A failed save")
// ---------------------------------------------------------------------------------------------

/// Serializes to nothing JSON can hold: `save_json` fails before anything is written.
struct Unserializable;

impl serde::Serialize for Unserializable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom(
            "the charge handle cannot be serialized",
        ))
    }
}

/// `save_json` is a save (`RecoveryPoints::save_json`: "[`save`] with `value` as JSON"); when
/// it fails after the side effect, the key must be kept. It is released: the retry charges
/// again.
#[tokio::test]
async fn a_failed_save_json_keeps_the_key() {
    let charges = Arc::new(Mutex::new(0));
    let handler = {
        let charges = charges.clone();
        move |Extension(points): Extension<RecoveryPoints>, _body: String| {
            let charges = charges.clone();
            async move {
                if points.load().await.unwrap().is_none() {
                    *charges.lock().unwrap() += 1; // the side effect
                    let saved = points.save_json("charged", &Unserializable).await;
                    assert!(matches!(saved, Err(RecoveryError::Json(_))), "{saved:?}");
                }
                // A careless handler answers 500 after the failed save.
                (StatusCode::INTERNAL_SERVER_ERROR, "{}")
            }
        }
    };
    let router = Router::new().route("/payments", post(handler));
    let mut app = tower::Layer::layer(&IdempotencyLayer::new(), router);
    let key = unique("json");
    assert_eq!(
        send(&mut app, request(Some(&key), "{}", &[])).await.status,
        500
    );
    let retry = send(&mut app, request(Some(&key), "{}", &[])).await;
    assert_eq!(retry.status, 500);
    assert!(
        retry.replayed(),
        "the run's answer is kept after a failed save"
    );
    assert_eq!(*charges.lock().unwrap(), 1, "the card was charged twice");
}

/// After a failed save (over the limit), a handler that finishes and answers 201 with
/// `Cache-Control: no-store` (common on payment APIs) must get its answer to the client and
/// kept for the retries ("finish its work and answer: the layer stores that outcome"). The
/// client is told 500 `#progress-unsaved` instead, for a payment that went through.
#[tokio::test]
async fn a_no_store_answer_after_a_failed_save_reaches_the_client() {
    let handler = |Extension(points): Extension<RecoveryPoints>, _body: String| async move {
        let saved = points.save("charged", vec![b'x'; 100]).await;
        assert!(
            matches!(saved, Err(RecoveryError::TooLarge { .. })),
            "{saved:?}"
        );
        (
            StatusCode::CREATED,
            [("cache-control", "no-store")],
            r#"{"charge":"ch_1"}"#,
        )
    };
    let router = Router::new().route("/payments", post(handler));
    let layer = IdempotencyLayer::with_settings(Settings::default().max_recovery_point(10));
    let mut app = tower::Layer::layer(&layer, router);
    let key = unique("no-store");
    let answer = send(&mut app, request(Some(&key), "{}", &[])).await;
    assert_eq!(
        (
            answer.status,
            String::from_utf8_lossy(&answer.body).into_owned()
        ),
        (StatusCode::CREATED, r#"{"charge":"ch_1"}"#.to_owned()),
        "the handler's answer after a failed save"
    );
    let retry = send(&mut app, request(Some(&key), "{}", &[])).await;
    assert_eq!(retry.status, 201, "the stored answer is the handler's");
}

/// A keyed gRPC call of `payments.v1.Payments/Create`.
fn grpc_create(key: &str) -> axum::http::Request<Body> {
    axum::http::Request::post("/payments.v1.Payments/Create")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("idempotency-key", key)
        .body(Body::from(&b"\0\0\0\0\x02\x08\x01"[..]))
        .unwrap()
}

/// gRPC: after a failed save, a call that answers a gRPC error (`grpc-status: 9`,
/// trailers-only) must have that answer given and stored ("the handler's answer is stored
/// whatever its status"). The layer answers `INTERNAL` (#progress-unsaved) instead.
#[tokio::test]
async fn grpc_an_error_status_after_a_failed_save_is_the_answer_kept() {
    let handler = |Extension(points): Extension<RecoveryPoints>, _body: axum::body::Bytes| async move {
        let saved = points.save("charged", vec![b'x'; 100]).await;
        assert!(
            matches!(saved, Err(RecoveryError::TooLarge { .. })),
            "{saved:?}"
        );
        (
            StatusCode::OK,
            [
                ("content-type", "application/grpc"),
                ("grpc-status", "9"),
                ("grpc-message", "card charged; order closed"),
            ],
            "",
        )
    };
    let router = Router::new().route("/payments.v1.Payments/Create", post(handler));
    let layer = IdempotencyLayer::with_settings(Settings::default().max_recovery_point(10));
    let mut app = tower::Layer::layer(&layer, router);
    let key = unique("grpc");
    let call = || grpc_create(&key);
    let first = send(&mut app, call()).await;
    assert_eq!(
        first
            .headers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some("9"),
        "the handler's gRPC answer after a failed save; got {:?}",
        first.headers
    );
    let retry = send(&mut app, call()).await;
    assert!(retry.replayed(), "{:?}", retry.headers);
    assert_eq!(
        retry
            .headers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some("9")
    );
}

/// gRPC, past `max_stored_body`: after a failed save, an error answer too large to keep cannot
/// be replayed, so the key keeps 500 `#progress-unsaved` (`INTERNAL`), as before gRPC answers
/// past the bound were kept by their head; never the head-only record of a success, whose
/// duplicates are told the call succeeded (`FAILED_PRECONDITION`).
#[tokio::test]
async fn grpc_an_error_past_the_bound_after_a_failed_save_is_kept_as_progress_unsaved() {
    let handler = |Extension(points): Extension<RecoveryPoints>, _body: axum::body::Bytes| async move {
        let saved = points.save("charged", vec![b'x'; 100]).await;
        assert!(matches!(saved, Err(RecoveryError::TooLarge { .. })));
        (
            StatusCode::OK,
            [
                ("content-type", "application/grpc"),
                ("grpc-status", "9"),
                ("grpc-message", "card charged; order closed"),
            ],
            vec![0u8; 4096],
        )
    };
    let router = Router::new().route("/payments.v1.Payments/Create", post(handler));
    let layer = IdempotencyLayer::with_settings(Settings::default().max_recovery_point(10))
        .max_stored_body(1024);
    let mut app = tower::Layer::layer(&layer, router);
    let key = unique("grpc-large");
    let call = || grpc_create(&key);
    for attempt in 0..2 {
        let answer = send(&mut app, call()).await;
        let status = answer
            .headers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap());
        assert_eq!(
            status,
            Some("13"),
            "attempt {attempt}: {:?}",
            answer.headers
        );
        let message = answer.headers["grpc-message"].to_str().unwrap();
        assert!(message.starts_with("progress-unsaved"), "{message}");
    }
}

/// Consumer layer: "The consumer layer likewise stores the failure instead of releasing the
/// message." A handler whose save failed (over the limit) and whose outcome then cannot be
/// stored (it is not JSON-serializable) gets its message released: the redelivery repeats the
/// side effect.
#[tokio::test]
async fn consumer_a_failed_save_never_releases_the_message() {
    use tower::{service_fn, BoxError, ServiceExt};
    use tower_idempotency::consumer::{IdempotentConsumerLayer, Identity};
    let effects = Arc::new(Mutex::new(0));
    let handler = service_fn({
        let effects = effects.clone();
        move |_amount: u32| {
            let effects = effects.clone();
            async move {
                let points = RecoveryPoints::current().expect("inside the consumer layer");
                if points.load().await?.is_none() {
                    *effects.lock().unwrap() += 1;
                    let saved = points.save("shipped", vec![b'x'; 100]).await;
                    assert!(matches!(saved, Err(RecoveryError::TooLarge { .. })));
                }
                // Not JSON: a map whose keys are not strings.
                let mut outcome = HashMap::new();
                outcome.insert((1u8, 2u8), 3u8);
                Ok::<_, BoxError>(outcome)
            }
        }
    });
    let settings = Settings::new(MemoryStore::default()).max_recovery_point(10);
    let layer = IdempotentConsumerLayer::with_settings(
        |amount: &u32| Identity::new("order-1").fingerprint(&amount.to_be_bytes()),
        settings,
    );
    let consumer = tower::Layer::layer(&layer, handler);
    let first = consumer.clone().oneshot(1).await;
    assert!(first.is_err(), "{:?}", first.as_ref().map(|_| ()));
    let _ = consumer.oneshot(1).await;
    assert_eq!(*effects.lock().unwrap(), 1, "the redelivery shipped again");
}

// ---------------------------------------------------------------------------------------------
// Promise: "read the request body before the first `load` or `save` (... a body the handler
// dropped unread is read out then). A handler still holding an unread body gets
// `RecoveryError::RequestUnread`." (docs/recovery-points.md)
// ---------------------------------------------------------------------------------------------

/// A request whose body arrives in two chunks, the second after `delay` (a slow client).
fn slow_request(
    key: &str,
    first: &'static str,
    second: &'static str,
    delay: Duration,
) -> axum::http::Request<Body> {
    let chunks = futures_stream(first, second, delay);
    axum::http::Request::post("/payments")
        .header("idempotency-key", key)
        .body(Body::from_stream(chunks))
        .unwrap()
}

fn futures_stream(
    first: &'static str,
    second: &'static str,
    delay: Duration,
) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, Infallible>> + Send + 'static {
    use futures_util::StreamExt;
    futures_util::stream::iter([first, second])
        .enumerate()
        .then(move |(i, chunk)| async move {
            if i == 1 {
                tokio::time::sleep(delay).await;
            }
            Ok(axum::body::Bytes::from_static(chunk.as_bytes()))
        })
}

/// A handler that dropped its body unread, then loads its point from two tasks at once (two
/// sub-steps checking progress concurrently): both must get the point (none yet). The second
/// gets `RequestUnread` although no one holds the body: the first call took it out to read it.
#[tokio::test]
async fn concurrent_loads_after_a_dropped_body_both_read_the_point() {
    let log = Log::default();
    let handler = {
        let log = log.clone();
        move |Extension(points): Extension<RecoveryPoints>, body: Body| {
            let log = log.clone();
            async move {
                drop(body); // dropped unread: "read out then"
                let (a, b) = tokio::join!(points.load(), points.load());
                log.push(format!("{} / {}", describe(a), describe(b)));
                (StatusCode::CREATED, "{}")
            }
        }
    };
    let router = Router::new().route("/payments", post(handler));
    let mut app = tower::Layer::layer(&IdempotencyLayer::new(), router);
    let key = unique("concurrent");
    let answer = send(
        &mut app,
        slow_request(&key, "{\"amount\":", "1}", Duration::from_millis(100)),
    )
    .await;
    assert_eq!(answer.status, 201);
    assert_eq!(log.lines(), ["none / none"]);
}

/// A handler that dropped its body unread and bounds its point load with a timeout (a slow
/// client: the read-out takes longer). The timed-out load loses the body: every later load is
/// `RequestUnread` (no one holds the body), and the answer is stored bound to no payload, so
/// another payload with the key is replayed instead of refused 422.
#[tokio::test]
async fn a_timed_out_load_does_not_lose_the_requests_binding() {
    let log = Log::default();
    let handler = {
        let log = log.clone();
        move |Extension(points): Extension<RecoveryPoints>, body: Body| {
            let log = log.clone();
            async move {
                drop(body);
                let first = tokio::time::timeout(Duration::from_millis(20), points.load()).await;
                log.push(format!("first timed out: {}", first.is_err()));
                tokio::time::sleep(Duration::from_millis(200)).await;
                log.push(describe(points.load().await));
                (StatusCode::CREATED, "{}")
            }
        }
    };
    let router = Router::new().route("/payments", post(handler));
    let mut app = tower::Layer::layer(&IdempotencyLayer::new(), router);
    let key = unique("timeout");
    let answer = send(
        &mut app,
        slow_request(&key, "{\"amount\":", "1}", Duration::from_millis(100)),
    )
    .await;
    assert_eq!(answer.status, 201);
    let other = send(&mut app, request(Some(&key), r#"{"amount":500}"#, &[])).await;
    assert_eq!(
        (log.lines(), other.status.as_u16()),
        (
            vec!["first timed out: true".to_owned(), "none".to_owned()],
            422
        ),
        "the dropped body is still read out for the second load, and another payload is refused"
    );
}

/// Drain (docs/shutdown.md: claims still held at the drain deadline are released) against
/// "After a failed save in a run ..., it never releases the key". A run charged, its save
/// failed, and it is still finishing the payment when the drain deadline passes: its claim is
/// released, and the retry on another instance charges again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_never_releases_a_run_whose_save_failed() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let store = MemoryStore::default();
    let charges = Arc::new(AtomicUsize::new(0));
    let handler = {
        let charges = charges.clone();
        move |Extension(points): Extension<RecoveryPoints>, _body: String| {
            let charges = charges.clone();
            async move {
                if points.load().await.unwrap().is_none() {
                    charges.fetch_add(1, Ordering::SeqCst); // the side effect
                    let saved = points.save("charged", vec![b'x'; 100]).await;
                    assert!(
                        matches!(saved, Err(RecoveryError::TooLarge { .. })),
                        "{saved:?}"
                    );
                    // Finishing the payment, slowly (the store is slow: that is why it failed).
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                (StatusCode::CREATED, "{}")
            }
        }
    };
    let router = Router::new().route("/payments", post(handler));
    let settings = Settings::new(store.clone()).max_recovery_point(10);
    let drain = settings.drain_handle();
    let mut draining =
        tower::Layer::layer(&IdempotencyLayer::with_settings(settings), router.clone());
    let mut other = tower::Layer::layer(
        &IdempotencyLayer::with_settings(Settings::new(store).max_recovery_point(10)),
        router,
    );
    let key = unique("drain");
    let first = tokio::spawn({
        let key = key.clone();
        async move {
            send(&mut draining, request(Some(&key), "{}", &[]))
                .await
                .status
        }
    });
    while charges.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = drain.drain(Duration::from_millis(50)).await;
    let retry = send(&mut other, request(Some(&key), "{}", &[])).await;
    let _ = first.await;
    assert_eq!(
        charges.load(Ordering::SeqCst),
        1,
        "charged twice: the drain released the run whose save failed ({report:?}); the retry on \
         another instance answered {} and ran again",
        retry.status
    );
}

// ---------------------------------------------------------------------------------------------
// Promise: "a request that reuses the key with another payload gets `RecoveryError::KeyReused`
// from `load` and `save`, and the layer answers it 422 `#key-reused` whatever the handler
// returns ... The point stays for the request that saved it, whose retry resumes."
// ---------------------------------------------------------------------------------------------

/// A handler that saves without loading first (allowed: "two [round trips] for a run's first
/// save when it did not load first: the key's point is checked to be this request's own"),
/// with data derived from the payload. The attacker's payload makes that data oversized: the
/// save answers `TooLarge` before the ownership check, so the run counts as "save failed", its
/// 201 is stored under the key, its completion deletes the original's point, and the original
/// payload's retry gets 422 instead of resuming.
#[tokio::test]
async fn an_oversized_save_by_another_payload_is_still_refused_as_key_reused() {
    let log = Log::default();
    let handler = {
        let log = log.clone();
        move |Extension(points): Extension<RecoveryPoints>, body: String| {
            let log = log.clone();
            async move {
                if body.contains("ship") {
                    // This route's handler: ship, then save the shipment (derived from the
                    // payload) without loading first.
                    let saved = points.save("shipped", body.into_bytes()).await;
                    log.push(format!("save-first: {saved:?}"));
                    return (StatusCode::CREATED, "{}");
                }
                let found = describe(points.load().await);
                if found == "none" {
                    let saved = points.save("charged", "ch_1").await;
                    log.push(format!("{found}; {saved:?}"));
                    return (StatusCode::INTERNAL_SERVER_ERROR, "{}");
                }
                log.push(found);
                (StatusCode::CREATED, "{}")
            }
        }
    };
    let router = Router::new().route("/payments", post(handler));
    let layer = IdempotencyLayer::with_settings(Settings::default().max_recovery_point(64));
    let mut app = tower::Layer::layer(&layer, router);
    let key = unique("oversized");
    let original = r#"{"amount":1}"#;
    assert_eq!(
        send(&mut app, request(Some(&key), original, &[]))
            .await
            .status,
        500
    );
    let attack: &'static str =
        Box::leak(format!(r#"{{"ship":"{}"}}"#, "x".repeat(200)).into_boxed_str());
    let other = send(&mut app, request(Some(&key), attack, &[])).await;
    let retry = send(&mut app, request(Some(&key), original, &[])).await;
    assert_eq!(
        (other.status.as_u16(), retry.status.as_u16()),
        (422, 201),
        "another payload is refused 422 and the original resumes; handler runs: {:?}",
        log.lines()
    );
}

/// Same promise, through `RequestUnread`: another payload's handler that saves while still
/// holding its body (a careless handler: it gets `RequestUnread`, a failed save) has its answer
/// stored under the key, which deletes the original's point; the original's retry then gets
/// 422 instead of resuming. The layer reads the body out at the end anyway: the key's point
/// could be checked against it before the answer is stored.
#[tokio::test]
async fn an_unread_body_save_by_another_payload_never_takes_the_key() {
    let log = Log::default();
    let handler = {
        let log = log.clone();
        move |Extension(points): Extension<RecoveryPoints>, headers: HeaderMap, body: Body| {
            let log = log.clone();
            async move {
                if headers.contains_key("x-save-unread") {
                    let saved = points.save("shipped", "parcel").await;
                    log.push(format!("save-unread: {saved:?}"));
                    drop(body);
                    return (StatusCode::CREATED, "{}");
                }
                let _ = axum::body::to_bytes(body, usize::MAX).await.unwrap();
                let found = describe(points.load().await);
                if found == "none" {
                    let saved = points.save("charged", "ch_1").await;
                    log.push(format!("{found}; {saved:?}"));
                    return (StatusCode::INTERNAL_SERVER_ERROR, "{}");
                }
                log.push(found);
                (StatusCode::CREATED, "{}")
            }
        }
    };
    let router = Router::new().route("/payments", post(handler));
    let mut app = tower::Layer::layer(&IdempotencyLayer::new(), router);
    let key = unique("unread");
    let original = r#"{"amount":1}"#;
    assert_eq!(
        send(&mut app, request(Some(&key), original, &[]))
            .await
            .status,
        500
    );
    let other = send(
        &mut app,
        request(Some(&key), r#"{"amount":500}"#, &[("x-save-unread", "1")]),
    )
    .await;
    let retry = send(&mut app, request(Some(&key), original, &[])).await;
    assert_eq!(
        (other.status.as_u16(), retry.status.as_u16()),
        (422, 201),
        "another payload is refused 422 and the original resumes; handler runs: {:?}",
        log.lines()
    );
}

// ---------------------------------------------------------------------------------------------
// Attacks that held (these pass on the current code; kept as guards).
// ---------------------------------------------------------------------------------------------

/// Held: with `OnConflict::Wait`, another payload waiting on the original that saved a point
/// and then failed gets 422 once it runs; the original's retry resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_a_waiting_duplicate_with_another_payload_gets_422() {
    let log = Log::default();
    let layer = IdempotencyLayer::with_settings(
        Settings::default()
            .on_conflict(tower_idempotency::OnConflict::Wait(Duration::from_secs(3))),
    );
    let app = loading_app(layer, log.clone());
    let key = unique("wait");
    let first = tokio::spawn({
        let (mut app, key) = (app.clone(), key.clone());
        async move {
            send(
                &mut app,
                request(
                    Some(&key),
                    r#"{"amount":1}"#,
                    &[
                        ("x-save", "charged"),
                        ("x-status", "500"),
                        ("x-delay-ms", "300"),
                    ],
                ),
            )
            .await
            .status
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut app2 = app.clone();
    let other = send(&mut app2, request(Some(&key), r#"{"amount":500}"#, &[])).await;
    assert_eq!(first.await.unwrap(), 500);
    assert_eq!(other.status, 422);
    let retry = send(&mut app2, request(Some(&key), r#"{"amount":1}"#, &[])).await;
    assert_eq!(retry.status, 201);
    assert_eq!(log.lines().last().unwrap(), "charged=data; nothing");
}

/// Held: the same key and payload on another path (another method-path identity) never reads
/// the point.
#[tokio::test]
async fn held_another_path_never_reads_the_point() {
    let log = Log::default();
    let mut app = loading_app(IdempotencyLayer::new(), log.clone());
    let key = unique("path");
    let failed = send(
        &mut app,
        request(
            Some(&key),
            "{}",
            &[("x-save", "charged"), ("x-status", "500")],
        ),
    )
    .await;
    assert_eq!(failed.status, 500);
    let mut refund = request(Some(&key), "{}", &[]);
    *refund.uri_mut() = "/refunds".parse().unwrap();
    assert_eq!(send(&mut app, refund).await.status, 201);
    let retry = send(&mut app, request(Some(&key), "{}", &[])).await;
    assert_eq!(retry.status, 201);
    assert_eq!(
        log.lines(),
        ["none; saved", "none; nothing", "charged=data; nothing"]
    );
}

/// Held: a 4xx after a failed save (over the limit) is stored and replayed; the handler ran
/// once.
#[tokio::test]
async fn held_a_4xx_after_a_failed_save_is_kept() {
    let log = Log::default();
    let layer = IdempotencyLayer::with_settings(Settings::default().max_recovery_point(4));
    let mut app = loading_app(layer, log.clone());
    let key = unique("4xx");
    let first = send(
        &mut app,
        request(
            Some(&key),
            "{}",
            &[("x-save", "charged"), ("x-status", "409")],
        ),
    )
    .await;
    assert_eq!(first.status, 409);
    let retry = send(&mut app, request(Some(&key), "{}", &[])).await;
    assert_eq!(retry.status, 409);
    assert!(retry.replayed());
    assert_eq!(log.lines().len(), 1);
}

/// Held: a handler holding a half-read body gets `RequestUnread` from `load`.
#[tokio::test]
async fn held_a_half_read_body_is_request_unread() {
    let log = Log::default();
    let handler = {
        let log = log.clone();
        move |Extension(points): Extension<RecoveryPoints>, body: Body| {
            let log = log.clone();
            async move {
                use http_body_util::BodyExt;
                let mut body = body;
                let _first = body.frame().await;
                log.push(describe(points.load().await));
                drop(body);
                log.push(describe(points.load().await));
                (StatusCode::CREATED, "{}")
            }
        }
    };
    let router = Router::new().route("/payments", post(handler));
    let mut app = tower::Layer::layer(&IdempotencyLayer::new(), router);
    let key = unique("half");
    let answer = send(
        &mut app,
        slow_request(&key, "{\"amount\":", "1}", Duration::from_millis(50)),
    )
    .await;
    assert_eq!(answer.status, 201);
    assert_eq!(log.lines(), ["load error: RequestUnread", "none"]);
}

/// Held: a head-only custom fingerprint binds the point to the head it hashes: another
/// account header with the key gets 422.
#[tokio::test]
async fn held_a_head_only_fingerprint_binds_the_point_to_the_head() {
    let log = Log::default();
    let fingerprint = tower_idempotency::fingerprint::Fingerprint::custom(|parts, hasher| {
        hasher.update(
            parts
                .headers
                .get("x-account")
                .map_or(&b""[..], |v| v.as_bytes()),
        )
    })
    .without_body();
    let mut app = loading_app(
        IdempotencyLayer::new().fingerprint(fingerprint),
        log.clone(),
    );
    let key = unique("head");
    let failed = send(
        &mut app,
        request(
            Some(&key),
            "{}",
            &[
                ("x-account", "a"),
                ("x-save", "charged"),
                ("x-status", "500"),
            ],
        ),
    )
    .await;
    assert_eq!(failed.status, 500);
    let other = send(&mut app, request(Some(&key), "{}", &[("x-account", "b")])).await;
    assert_eq!(other.status, 422);
    let retry = send(
        &mut app,
        request(Some(&key), "{\"other\":1}", &[("x-account", "a")]),
    )
    .await;
    assert_eq!(retry.status, 201);
}

/// Held: a point damaged in the store (one byte of its data flipped in SQLite) is never
/// handed out, neither to its own payload's retry (a store error, `Corrupt`) nor to another
/// payload.
#[tokio::test]
async fn held_a_damaged_point_is_never_handed_out() {
    let dir = support::servers::TempDir::new("attack-damaged-point");
    let path = dir.path().join("db.sqlite");
    let store = tower_idempotency::store::SqliteStore::open(&path)
        .await
        .unwrap();
    let log = Log::default();
    let mut app = loading_app(
        IdempotencyLayer::with_settings(Settings::new(store)),
        log.clone(),
    );
    let key = unique("damaged");
    let failed = send(
        &mut app,
        request(
            Some(&key),
            "{}",
            &[("x-save", "charged"), ("x-status", "500")],
        ),
    )
    .await;
    assert_eq!(failed.status, 500);
    {
        let db = rusqlite::Connection::open(&path).unwrap();
        let mut point: Vec<u8> = db
            .query_row("SELECT point FROM idempotency_points", [], |row| row.get(0))
            .unwrap();
        *point.last_mut().unwrap() ^= 1;
        db.execute("UPDATE idempotency_points SET point = ?1", [point])
            .unwrap();
    }
    let other = send(
        &mut app,
        request(Some(&key), r#"{"a":1}"#, &[("x-status", "503")]),
    )
    .await;
    let retry = send(&mut app, request(Some(&key), "{}", &[("x-status", "503")])).await;
    assert_eq!((other.status.as_u16(), retry.status.as_u16()), (503, 503));
    let lines = log.lines();
    assert!(
        lines[1].starts_with("load error: Store(Corrupt"),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with("load error: Store(Corrupt"),
        "{lines:?}"
    );
}

/// The targeted form of the hash-tag break: the victim uses a plain key (no braces). The
/// attacker, another tenant, sends a key that is `{` + the victim's Redis record key + `}`:
/// its point key is the victim's. The attacker's request reads the victim's point (the charge
/// id), and the attacker's completion removes it, so the victim's retry charges again.
#[tokio::test]
async fn redis_another_tenant_cannot_aim_a_key_at_a_victims_point() {
    let Some(url) = redis_url() else { return };
    let store = RedisStore::connect(&url).await.expect("connect to redis");
    let log = Log::default();
    let layer = IdempotencyLayer::with_settings(Settings::new(store)).scope(|parts| {
        parts
            .headers
            .get("x-tenant")
            .map(|v| v.to_str().unwrap().to_owned())
    });
    let mut app = loading_app(layer, log.clone());
    let victim_key = unique("victim");
    let victim_store_key = tower_idempotency::admin::http_key(
        "alice",
        &axum::http::Method::POST,
        "/payments",
        &victim_key,
    );
    let aimed = format!("\"{{idempotency:{victim_store_key}}}\"");
    let failed = send(
        &mut app,
        request(
            Some(&victim_key),
            "{}",
            &[
                ("x-tenant", "alice"),
                ("x-save", "charged"),
                ("x-status", "500"),
            ],
        ),
    )
    .await;
    assert_eq!(failed.status, 500);
    let attack = send(
        &mut app,
        request(Some(&aimed), "{}", &[("x-tenant", "mallory")]),
    )
    .await;
    assert_eq!(
        attack.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&attack.body)
    );
    let retry = send(
        &mut app,
        request(Some(&victim_key), "{}", &[("x-tenant", "alice")]),
    )
    .await;
    assert_eq!(retry.status, 201);
    assert_eq!(
        log.lines(),
        ["none; saved", "none; nothing", "charged=data; nothing"],
        "tenant mallory's key {aimed} reached tenant alice's point"
    );
}

// ---------------------------------------------------------------------------------------------
// A careless operator: a TTL shorter than the lease. Promise: "A point survives the crash of
// the process that saved it (on any store that outlives the process: SQLite, ...), so the next
// run of the key, on any instance, reads it" (docs/recovery-points.md), and docs/failures.md:
// "zero or absurd durations ... refused with a panic that names the knob".
// ---------------------------------------------------------------------------------------------

fn ledger(dir: &support::servers::TempDir) -> Vec<String> {
    std::fs::read_to_string(dir.path().join("ledger.txt"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `--ttl 1 --lock-ttl 4` on SQLite: the demo charges, saves its point, is killed (`kill -9`).
/// The point is saved with the 1 s TTL, so it is gone before the 4 s lease lets the retry in:
/// the retry charges the card again. Settings accept the TTL below the lease silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_ttl_below_the_lease_never_loses_a_crashed_runs_point() {
    let dir = support::servers::TempDir::new("attack-ttl-lease");
    let store = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    let ledger_path = dir.path().join("ledger.txt").display().to_string();
    let args = [
        "--store",
        store.as_str(),
        "--ttl",
        "1",
        "--lock-ttl",
        "4",
        "--provider-ledger",
        ledger_path.as_str(),
    ];
    let key = unique("ttl");
    let body = r#"{"amount": 1000, "currency": "usd", "delay_ms": 3000}"#;
    let mut first = support::demo::Demo::start(&args).await;
    let sent = tokio::spawn({
        let (base, key) = (first.base.clone(), key.clone());
        async move {
            let _ = support::demo::try_post_to(&base, "acme", &key, body).await;
        }
    });
    while ledger(&dir).is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.kill();
    let _ = sent.await;
    let second = support::demo::Demo::start(&args).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let retry = loop {
        let reply = second.try_post("acme", &key, body).await.expect("answers");
        if reply.status != 409 {
            break reply;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never lapsed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        retry.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&retry.body)
    );
    assert_eq!(
        ledger(&dir).len(),
        1,
        "the card was charged again: the crashed run's point expired (TTL 1 s) before its \
         lease (4 s) let the retry in"
    );
}

/// The brace attacks above, on a store that keys points by the whole record key.
async fn brace_keys_keep_their_own_points<St: Store + Clone>(store: St) {
    let log = Log::default();
    let layer = IdempotencyLayer::with_settings(Settings::new(store)).scope(|parts| {
        parts
            .headers
            .get("x-tenant")
            .map(|v| v.to_str().unwrap().to_owned())
    });
    let mut app = loading_app(layer, log.clone());
    let victim_key = unique("victim");
    let victim_store_key = tower_idempotency::admin::http_key(
        "alice",
        &axum::http::Method::POST,
        "/payments",
        &victim_key,
    );
    let tag = unique("tag");
    for (victim, attacker) in [
        (
            victim_key.clone(),
            format!("\"{{idempotency:{victim_store_key}}}\""),
        ),
        (format!("{{{tag}}}-a"), format!("{{{tag}}}-b")),
        (format!("x{{}}}}{tag}"), format!("x{{}}}}{tag}:point")),
    ] {
        log.0.lock().unwrap().clear();
        let failed = send(
            &mut app,
            request(
                Some(&victim),
                "{}",
                &[
                    ("x-tenant", "alice"),
                    ("x-save", "charged"),
                    ("x-status", "500"),
                ],
            ),
        )
        .await;
        assert_eq!(failed.status, 500);
        let attack = send(
            &mut app,
            request(Some(&attacker), "{}", &[("x-tenant", "alice")]),
        )
        .await;
        assert_eq!(attack.status, 201);
        let retry = send(
            &mut app,
            request(Some(&victim), "{}", &[("x-tenant", "alice")]),
        )
        .await;
        assert_eq!(retry.status, 201);
        assert_eq!(
            log.lines(),
            ["none; saved", "none; nothing", "charged=data; nothing"],
            "{attacker}"
        );
    }
}

/// Held: SQLite keeps each key's point under its whole key.
#[tokio::test]
async fn held_sqlite_brace_keys_keep_their_own_points() {
    let dir = support::servers::TempDir::new("attack-brace-sqlite");
    let store = tower_idempotency::store::SqliteStore::open(dir.path().join("db.sqlite"))
        .await
        .unwrap();
    brace_keys_keep_their_own_points(store).await;
}

/// Held: PostgreSQL keeps each key's point under its whole key.
#[tokio::test]
async fn held_postgres_brace_keys_keep_their_own_points() {
    let Some(url) = support::servers::postgres_url() else {
        return;
    };
    let store = tower_idempotency::store::PostgresStore::connect(&url)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    brace_keys_keep_their_own_points(store).await;
}

/// Held: the memory store keeps each key's point under its whole key.
#[tokio::test]
async fn held_memory_brace_keys_keep_their_own_points() {
    brace_keys_keep_their_own_points(MemoryStore::default()).await;
}

/// docs/recovery-points.md, "What happens when a store has no room left", memory: points are
/// "charged to the store's byte capacity like records; the save fails only when the point
/// alone is larger than the store can hold". 70,000 tiny points (a few MB, far below the
/// store's capacity), each left by a run that saved and failed (the demo's `"fail": true`
/// does it from outside): past 1,024 points in a shard every new save fails, so every later
/// run of any key in that shard loses its points.
#[tokio::test]
async fn memory_tiny_points_never_fail_for_lack_of_room() {
    let store = MemoryStore::default();
    let ttl = Duration::from_secs(3600);
    let mut failed = Vec::new();
    for i in 0..70_000 {
        let key = format!("flood-{i}");
        let token = tower_idempotency::store::OwnerToken::random();
        match store
            .claim_as(&key, &token, Duration::from_secs(30))
            .await
            .unwrap()
        {
            tower_idempotency::store::ClaimOutcome::Claimed(_) => {}
            other => panic!("{other:?}"),
        }
        let point = tower_idempotency::store::RecoveryPoint::new("charged", "ch_1");
        if let Err(error) = store.save_point(&key, &token, &point, ttl).await {
            failed.push((i, error.to_string()));
        }
        store.release(&key, &token).await.unwrap();
    }
    assert!(
        failed.is_empty(),
        "{} of 70,000 tiny point saves failed, the first at #{}: {}",
        failed.len(),
        failed[0].0,
        failed[0].1
    );
}

/// Same row: memory points are "charged to the store's byte capacity like records; the save
/// fails only when the point alone is larger than the store can hold". A 64 KiB store takes
/// 100 points of 60 KiB (6 MB: nothing evicted, nothing refused, `weighted_size` 0): points
/// are not charged at all, so the capacity bounds nothing (at the default limits: 65,536
/// points of 64 KiB, 4 GiB, in a store sized 64 MiB).
#[tokio::test]
async fn memory_points_are_charged_to_the_capacity() {
    use tower_idempotency::store::{ClaimOutcome, OwnerToken, RecoveryPoint};
    let capacity = 64 * 1024;
    let store = MemoryStore::builder().max_bytes(capacity).build();
    let ttl = Duration::from_secs(3600);
    let claim = |key: String| {
        let store = store.clone();
        async move {
            let token = OwnerToken::random();
            match store
                .claim_as(&key, &token, Duration::from_secs(30))
                .await
                .unwrap()
            {
                ClaimOutcome::Claimed(_) => token,
                other => panic!("{other:?}"),
            }
        }
    };
    let mut saved = 0;
    for i in 0..100 {
        let key = format!("big-{i}");
        let token = claim(key.clone()).await;
        let point = RecoveryPoint::new("charged", vec![b'x'; 60 * 1024]);
        if store.save_point(&key, &token, &point, ttl).await.is_ok() {
            saved += 1;
        }
        store.release(&key, &token).await.unwrap();
    }
    let mut held = 0u64;
    for i in 0..100 {
        let key = format!("big-{i}");
        let token = claim(key.clone()).await;
        if let Some(point) = store.load_point(&key, &token).await.unwrap() {
            held += point.data().len() as u64;
        }
        store.release(&key, &token).await.unwrap();
    }
    assert!(
        held <= capacity,
        "a {capacity}-byte store holds {held} bytes of points ({saved} of 100 saves accepted, \
         weighted_size {})",
        store.weighted_size()
    );
}

/// A careless operator hash-tags the store's prefix (`{payments}:`, the usual way to keep a
/// service's keys in one cluster slot). Every key's point is then `{payments}:point`: one
/// point for all keys of all tenants. A fresh key reads another key's point, and its completion
/// deletes it.
#[tokio::test]
async fn redis_a_hash_tagged_prefix_keeps_one_point_per_key() {
    let Some(url) = redis_url() else { return };
    let prefix = format!("{{{}}}:", unique("svc"));
    let store = RedisStore::connect(&url)
        .await
        .expect("connect to redis")
        .with_prefix(prefix.clone());
    let log = Log::default();
    let mut app = loading_app(
        IdempotencyLayer::with_settings(Settings::new(store)),
        log.clone(),
    );
    let (first, second) = (unique("order-1"), unique("order-2"));
    let failed = send(
        &mut app,
        request(
            Some(&first),
            "{}",
            &[("x-save", "charged"), ("x-status", "500")],
        ),
    )
    .await;
    assert_eq!(failed.status, 500);
    assert_eq!(
        send(&mut app, request(Some(&second), "{}", &[]))
            .await
            .status,
        201
    );
    assert_eq!(
        send(&mut app, request(Some(&first), "{}", &[]))
            .await
            .status,
        201
    );
    assert_eq!(
        log.lines(),
        ["none; saved", "none; nothing", "charged=data; nothing"],
        "with the prefix {prefix:?}, key {second:?} reached the point of key {first:?}"
    );
}
