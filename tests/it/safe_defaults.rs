//! Safe by default: misconfiguration, hostile input and overload never break the promise
//! silently. Each test names one promise.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::routing::post;
use axum::{Extension, Router};
use support::{app, request, send, Fault, FaultyStore};
use tower_idempotency::problem::ProblemKind;
use tower_idempotency::store::MemoryStore;
use tower_idempotency::{
    IdempotencyKey, IdempotencyLayer, OnStoreError, Outcome, ReleaseReason, Settings,
};

const BODY: &str = r#"{"amount": 1}"#;

#[derive(Clone)]
struct Tenant(String);

fn scoped() -> IdempotencyLayer {
    IdempotencyLayer::new().scope(|parts| parts.extensions.get::<Tenant>().map(|t| t.0.clone()))
}

/// The layer running before authentication finds no tenant: a keyed request is refused with
/// 500 instead of running unguarded (every duplicate would run again).
#[tokio::test]
async fn a_keyed_request_without_scope_is_refused_not_run_unguarded() {
    let (mut app, probe) = app(scoped());
    for _ in 0..2 {
        send(&mut app, request(Some("k"), BODY, &[]))
            .await
            .assert_problem(500, ProblemKind::MissingScope.slug());
    }
    assert_eq!(probe.executions(), 0, "the handler never ran unguarded");
    // Keyless requests are not the layer's business.
    assert_eq!(send(&mut app, request(None, BODY, &[])).await.status, 201);
}

#[tokio::test]
async fn allow_unscoped_lets_such_requests_through_explicitly() {
    let (mut app, probe) = app(scoped().allow_unscoped(true));
    for _ in 0..2 {
        assert_eq!(
            send(&mut app, request(Some("k"), BODY, &[])).await.status,
            201
        );
    }
    assert_eq!(probe.executions(), 2);
}

/// `skip_response_headers` replaces the default list, but never lets a cookie through.
#[tokio::test]
async fn set_cookie_is_never_replayed_whatever_the_skip_list() {
    let layer = IdempotencyLayer::new()
        .skip_response_headers([http::HeaderName::from_static("x-internal")]);
    let (mut app, _) = app(layer);
    let first = send(&mut app, request(Some("k"), BODY, &[("x-set-cookie", "1")])).await;
    assert_eq!(first.headers["set-cookie"], "session=secret");
    let replay = send(&mut app, request(Some("k"), BODY, &[("x-set-cookie", "1")])).await;
    assert!(replay.replayed());
    assert!(replay.headers.get("set-cookie").is_none());
}

#[test]
#[should_panic(expected = "the TTL must be between")]
fn an_absurd_ttl_is_refused_when_the_layer_is_built() {
    let _ = Settings::default().ttl(Duration::from_secs(u64::MAX));
}

#[test]
#[should_panic(expected = "the lease must be between")]
fn a_zero_lease_is_refused_when_the_layer_is_built() {
    let _ = Settings::default().lease(Duration::ZERO);
}

#[test]
#[should_panic(expected = "the TTL must be between")]
fn a_zero_ttl_is_refused_when_the_layer_is_built() {
    let _ = Settings::default().ttl(Duration::ZERO);
}

#[test]
#[should_panic(expected = "max_bytes must be at least")]
fn a_zero_byte_memory_store_is_refused() {
    let _ = MemoryStore::builder().max_bytes(0).build();
}

/// A panic in the layer's own path after the handler ran (here: in the store) answers 500,
/// releases the key so a retry runs, and never re-polls a finished future.
#[tokio::test]
async fn a_panic_after_the_claim_answers_500_and_releases_the_key() {
    let store = FaultyStore::new();
    let (mut app, probe) = app(IdempotencyLayer::with_store(store.clone()));
    store.set(Fault::PanicOnComplete);
    send(&mut app, request(Some("k"), BODY, &[]))
        .await
        .assert_problem(500, ProblemKind::HandlerPanicked.slug());
    store.set(Fault::None);
    // The guard released the key in the background: the retry runs, at once.
    let mut retry = send(&mut app, request(Some("k"), BODY, &[])).await;
    for _ in 0..100 {
        if retry.status != 409 {
            break;
        }
        tokio::task::yield_now().await;
        retry = send(&mut app, request(Some("k"), BODY, &[])).await;
    }
    assert_eq!(retry.status, 201);
    assert_eq!(probe.executions(), 2);
}

/// Work that outlives its clients is bounded: past the cap, new keyed requests get 503 with
/// `Retry-After` (back-pressure) until some of it finishes.
#[tokio::test]
async fn detached_work_is_capped_with_503_back_pressure() {
    let layer = IdempotencyLayer::with_settings(
        Settings::default()
            .max_detached(2)
            .max_detached_bytes(u64::MAX),
    );
    let (app, probe) = app(layer);
    let mut abandoned = Vec::new();
    for i in 0..2 {
        let mut app = app.clone();
        let key = format!("held-{i}");
        abandoned.push(tokio::spawn(async move {
            send(&mut app, request(Some(&key), BODY, &[("x-hold", "1")])).await
        }));
    }
    probe.started(2).await;
    for task in abandoned {
        task.abort();
        let _ = task.await;
    }
    let refused = send(&mut app.clone(), request(Some("new"), BODY, &[])).await;
    refused.assert_problem(503, ProblemKind::Overloaded.slug());
    assert!(refused.headers.contains_key("retry-after"));
    probe.release_held(2);
    while probe.finished() < 2 {
        tokio::task::yield_now().await;
    }
    let mut ok = send(&mut app.clone(), request(Some("new"), BODY, &[])).await;
    for _ in 0..100 {
        if ok.status != 503 {
            break;
        }
        tokio::task::yield_now().await;
        ok = send(&mut app.clone(), request(Some("new"), BODY, &[])).await;
    }
    assert_eq!(ok.status, 201, "room again once the detached work finished");
}

/// Declared request bytes count too: one detached 16 MiB upload fills a 16 MiB allowance.
#[tokio::test]
async fn detached_request_bytes_are_capped_too() {
    let layer = IdempotencyLayer::with_settings(
        Settings::default()
            .max_detached(100)
            .max_detached_bytes(16 * 1024 * 1024),
    );
    let (app, probe) = app(layer);
    let task = tokio::spawn({
        let mut app = app.clone();
        async move {
            let mut req = request(Some("big"), BODY, &[("x-hold", "1")]);
            req.headers_mut()
                .insert("content-length", http::HeaderValue::from(16 * 1024 * 1024));
            send(&mut app, req).await
        }
    });
    probe.started(1).await;
    task.abort();
    let _ = task.await;
    send(&mut app.clone(), request(Some("next"), BODY, &[]))
        .await
        .assert_problem(503, ProblemKind::Overloaded.slug());
    probe.release_held(1);
}

/// `a,b` is what a proxy makes of two `Idempotency-Key` fields: refused like two fields.
#[tokio::test]
async fn a_bare_key_with_a_comma_is_refused() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    send(&mut app, request(Some("a,b"), BODY, &[]))
        .await
        .assert_problem(400, ProblemKind::InvalidKey.slug());
    assert_eq!(
        send(&mut app, request(Some("\"a,b\""), BODY, &[]))
            .await
            .status,
        201,
        "a quoted key may hold a comma"
    );
    assert_eq!(probe.executions(), 1);
}

/// A duplicate's body is read only up to the limit: past it, 413, whatever it carries.
#[tokio::test]
async fn a_duplicate_body_over_the_limit_gets_413() {
    let (mut app, probe) = app(IdempotencyLayer::new().max_duplicate_body(1024));
    assert_eq!(
        send(&mut app, request(Some("k"), BODY, &[])).await.status,
        201
    );
    let big: &'static str = Box::leak("x".repeat(4096).into_boxed_str());
    send(&mut app, request(Some("k"), big, &[]))
        .await
        .assert_problem(413, ProblemKind::BodyTooLarge.slug());
    let mut streamed = request(Some("k"), BODY, &[]);
    *streamed.body_mut() = axum::body::Body::new(support::ChunkedBody::new(8192, 512, b'y', b'z'));
    send(&mut app, streamed)
        .await
        .assert_problem(413, ProblemKind::BodyTooLarge.slug());
    assert_eq!(probe.executions(), 1);
}

/// The handler sees the parsed key, as tower-http's request-id layer hands over its id; also
/// when the store is down and the layer fails open.
#[tokio::test]
async fn the_handler_finds_the_key_in_the_request_extensions() {
    let seen = Arc::new(Mutex::new(None));
    let router = Router::new().route(
        "/payments",
        post({
            let seen = seen.clone();
            move |Extension(key): Extension<IdempotencyKey>, _request: Request| async move {
                *seen.lock().unwrap() = Some(key.as_str().to_owned());
                "ok"
            }
        }),
    );
    let mut app = tower::Layer::layer(&IdempotencyLayer::new(), router.clone());
    // Quoted, quoted with escapes, bare, and so long that the store key is a digest of it (the
    // layer keeps no copy of a key whose store key ends with it: each must still arrive whole).
    let long = "k".repeat(255);
    for (sent, key) in [
        ("\"order 42\"", "order 42"),
        (r#""a \"b\" \\ c""#, r#"a "b" \ c"#),
        ("order-44", "order-44"),
        (long.as_str(), long.as_str()),
    ] {
        let answer = send(&mut app, request(Some(sent), BODY, &[])).await;
        assert_eq!(answer.status, 200, "{sent}");
        assert_eq!(seen.lock().unwrap().take().as_deref(), Some(key));
    }

    let store = FaultyStore::new();
    store.set(Fault::Fail);
    let failing_open = IdempotencyLayer::with_store(store).on_store_error(OnStoreError::FailOpen);
    let mut app = tower::Layer::layer(&failing_open, router);
    let answer = send(&mut app, request(Some("order-43"), BODY, &[])).await;
    assert_eq!(answer.status, 200);
    assert_eq!(seen.lock().unwrap().as_deref(), Some("order-43"));
}

/// A TTL chosen per request: the short-lived record expires while the default one stays.
#[tokio::test(start_paused = true)]
async fn a_per_request_ttl_is_honoured() {
    let layer = IdempotencyLayer::new().ttl_fn(|parts| {
        let secs = parts
            .headers
            .get("x-ttl-secs")?
            .to_str()
            .ok()?
            .parse()
            .ok()?;
        Some(Duration::from_secs(secs))
    });
    let (mut app, probe) = app(layer);
    send(
        &mut app,
        request(Some("short"), BODY, &[("x-ttl-secs", "10")]),
    )
    .await;
    send(&mut app, request(Some("long"), BODY, &[])).await;
    tokio::time::advance(Duration::from_secs(11)).await;
    let short = send(
        &mut app,
        request(Some("short"), BODY, &[("x-ttl-secs", "10")]),
    )
    .await;
    assert!(!short.replayed(), "expired after its own 10 s");
    assert!(send(&mut app, request(Some("long"), BODY, &[]))
        .await
        .replayed());
    assert_eq!(probe.executions(), 3);
}

/// The outcome hook fires exactly once per request, with a typed outcome.
#[tokio::test]
async fn the_outcome_hook_fires_once_per_request() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let layer = IdempotencyLayer::with_settings(Settings::default().on_outcome({
        let seen = seen.clone();
        move |outcome| seen.lock().unwrap().push(outcome)
    }));
    let (mut app, _) = app(layer);
    send(&mut app, request(Some("k"), BODY, &[])).await;
    send(&mut app, request(Some("k"), BODY, &[])).await;
    send(&mut app, request(Some("k"), "other", &[])).await;
    send(&mut app, request(Some("bad key"), BODY, &[])).await;
    send(&mut app, request(None, BODY, &[])).await;
    send(&mut app, request(Some("e"), BODY, &[("x-status", "500")])).await;
    assert_eq!(
        *seen.lock().unwrap(),
        [
            Outcome::Stored,
            Outcome::Replayed,
            Outcome::Mismatch,
            Outcome::InvalidKey,
            Outcome::Passthrough,
            Outcome::Released(ReleaseReason::Status),
        ]
    );
}

/// Clients match problem kinds by their type URI, not by string literals.
#[tokio::test]
async fn problem_kinds_round_trip_through_their_type_uri() {
    let (mut app, _) = app(IdempotencyLayer::new().require_key(true));
    let answer = send(&mut app, request(None, BODY, &[])).await;
    let uri = answer.json()["type"].as_str().unwrap().to_owned();
    assert_eq!(
        ProblemKind::from_type_uri(&uri),
        Some(ProblemKind::MissingKey)
    );
    assert_eq!(answer.status, ProblemKind::MissingKey.status());
    for kind in ProblemKind::ALL {
        assert_eq!(ProblemKind::from_type_uri(kind.type_uri()), Some(*kind));
    }
}

/// The same 10,000-character scope on the memory store (the shared stores run it in their
/// suites).
#[tokio::test]
async fn a_very_long_scope_works_on_the_memory_store() {
    let scope = "t".repeat(10_000);
    let (mut app, probe) = app(IdempotencyLayer::new().scope(move |_| Some(scope.clone())));
    assert_eq!(
        send(&mut app, request(Some("k"), BODY, &[])).await.status,
        201
    );
    assert!(send(&mut app, request(Some("k"), BODY, &[]))
        .await
        .replayed());
    assert_eq!(probe.executions(), 1);
}
