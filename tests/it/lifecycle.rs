//! The request lifecycle, behaviour by behaviour, through an axum router.

use crate::support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderName, Method, Request};
use support::*;
use tower_idempotency::store::MemoryStore;
use tower_idempotency::{Fingerprint, IdempotencyLayer, OnConflict, OnStoreError, Settings};

const BODY: &str = r#"{"amount":100}"#;

// 1. Which requests.

#[tokio::test]
async fn get_put_and_delete_pass_through_even_with_a_key() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        for _ in 0..2 {
            let request = Request::builder()
                .method(method.clone())
                .uri("/payments")
                .header("idempotency-key", "k")
                .body(Body::empty())
                .unwrap();
            let answer = send(&mut app, request).await;
            assert_eq!(answer.status, 201);
            assert!(!answer.replayed());
        }
    }
    assert_eq!(probe.executions(), 6);
}

#[tokio::test]
async fn post_and_patch_are_handled() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    for method in [Method::POST, Method::PATCH] {
        for _ in 0..2 {
            let request = Request::builder()
                .method(method.clone())
                .uri("/payments")
                .header("idempotency-key", "k")
                .body(Body::from(BODY))
                .unwrap();
            send(&mut app, request).await;
        }
    }
    assert_eq!(
        probe.executions(),
        2,
        "one run per method: the method is part of the key"
    );
}

#[tokio::test]
async fn a_predicate_replaces_the_method_check() {
    let layer = IdempotencyLayer::new().predicate(|parts| parts.method == Method::GET);
    let (mut app, probe) = app(layer);
    let get = || {
        Request::get("/payments")
            .header("idempotency-key", "k")
            .body(Body::empty())
            .unwrap()
    };
    send(&mut app, get()).await;
    assert!(send(&mut app, get()).await.replayed());
    send(&mut app, request(Some("k"), BODY, &[])).await;
    send(&mut app, request(Some("k"), BODY, &[])).await;
    assert_eq!(probe.executions(), 3, "GET opted in, POST opted out");
}

// 2. The key.

#[tokio::test]
async fn invalid_keys_get_400_and_the_handler_does_not_run() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    let long = "k".repeat(256);
    let cases: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"\"\"".to_vec(),
        long.into_bytes(),
        "caf\u{e9}".as_bytes().to_vec(),
        b"a\tb".to_vec(),
        b"\"a\tb\"".to_vec(),
        b"\"unterminated".to_vec(),
        b"\"bad\\escape\"".to_vec(),
        b"two words".to_vec(),
    ];
    for value in cases {
        let request = Request::post("/payments")
            .header(
                "idempotency-key",
                axum::http::HeaderValue::from_bytes(&value).unwrap(),
            )
            .body(Body::from(BODY))
            .unwrap();
        send(&mut app, request)
            .await
            .assert_problem(400, "invalid-key");
    }
    let two = Request::post("/payments")
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .body(Body::from(BODY))
        .unwrap();
    send(&mut app, two).await.assert_problem(400, "invalid-key");
    assert_eq!(probe.executions(), 0);
}

#[tokio::test]
async fn quoted_and_bare_spellings_are_one_key() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    send(&mut app, request(Some("8e03978e-40d5"), BODY, &[])).await;
    let retry = send(&mut app, request(Some("\"8e03978e-40d5\""), BODY, &[])).await;
    assert!(retry.replayed());
    assert_eq!(probe.executions(), 1);
}

#[tokio::test]
async fn the_key_length_limit_is_configurable() {
    let (mut app, probe) = app(IdempotencyLayer::new().max_key_len(8));
    send(&mut app, request(Some("12345678"), BODY, &[])).await;
    send(&mut app, request(Some("123456789"), BODY, &[]))
        .await
        .assert_problem(400, "invalid-key");
    assert_eq!(probe.executions(), 1);
}

#[tokio::test]
async fn the_header_name_is_configurable() {
    let (mut app, probe) =
        app(IdempotencyLayer::new().header_name(HeaderName::from_static("x-request-key")));
    for _ in 0..2 {
        send(&mut app, request(None, BODY, &[("x-request-key", "k")])).await;
    }
    assert_eq!(probe.executions(), 1);
}

// 3. Missing key.

#[tokio::test]
async fn without_a_key_requests_run_normally_each_time() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    for _ in 0..3 {
        let answer = send(&mut app, request(None, BODY, &[])).await;
        assert_eq!(answer.status, 201);
        assert!(!answer.replayed());
    }
    assert_eq!(probe.executions(), 3);
}

#[tokio::test]
async fn a_required_key_refuses_keyless_requests_with_400() {
    let (mut app, probe) = app(IdempotencyLayer::new().require_key(true));
    send(&mut app, request(None, BODY, &[]))
        .await
        .assert_problem(400, "missing-key");
    assert_eq!(probe.executions(), 0);
    let get = Request::get("/payments").body(Body::empty()).unwrap();
    assert_eq!(
        send(&mut app, get).await.status,
        201,
        "unhandled methods need no key"
    );
}

// 4. Scope.

fn tenant_scoped() -> IdempotencyLayer {
    IdempotencyLayer::new().scope(|parts| {
        parts
            .headers
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })
}

#[tokio::test]
async fn keys_of_two_tenants_never_meet() {
    let (mut app, probe) = app(tenant_scoped());
    let a = send(&mut app, request(Some("k"), BODY, &[("x-tenant", "a")])).await;
    let b = send(&mut app, request(Some("k"), BODY, &[("x-tenant", "b")])).await;
    assert!(!b.replayed(), "tenant b must not get tenant a's response");
    assert_ne!(a.body, b.body);
    assert!(
        send(&mut app, request(Some("k"), BODY, &[("x-tenant", "a")]))
            .await
            .replayed()
    );
    assert_eq!(probe.executions(), 2);
}

#[tokio::test]
async fn without_a_scope_function_all_clients_share_one_key_space() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    send(&mut app, request(Some("k"), BODY, &[("x-tenant", "a")])).await;
    let other = send(&mut app, request(Some("k"), BODY, &[("x-tenant", "b")])).await;
    assert!(other.replayed(), "documented: one shared key space");
    assert_eq!(probe.executions(), 1);
}

#[tokio::test]
async fn a_request_without_scope_passes_through_when_allowed() {
    // Refused with 500 by default: see tests/safe_defaults.rs.
    let (mut app, probe) = app(tenant_scoped().allow_unscoped(true));
    send(&mut app, request(Some("k"), BODY, &[])).await;
    assert!(!send(&mut app, request(Some("k"), BODY, &[]))
        .await
        .replayed());
    assert_eq!(probe.executions(), 2);
}

#[tokio::test]
async fn the_path_is_part_of_the_key() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    send(&mut app, request(Some("k"), BODY, &[])).await;
    let other = Request::post("/other")
        .header("idempotency-key", "k")
        .body(Body::from(BODY))
        .unwrap();
    assert!(!send(&mut app, other).await.replayed());
    assert_eq!(probe.executions(), 2);
}

// 5. Fingerprint.

#[tokio::test]
async fn a_different_body_with_the_same_key_gets_422() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    send(&mut app, request(Some("k"), BODY, &[])).await;
    send(&mut app, request(Some("k"), r#"{"amount":999}"#, &[]))
        .await
        .assert_problem(422, "key-reused");
    assert_eq!(probe.executions(), 1);
}

#[tokio::test]
async fn a_different_query_with_the_same_key_gets_422() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    let with_query = |q: &str| {
        Request::post(format!("/payments?{q}"))
            .header("idempotency-key", "k")
            .body(Body::from(BODY))
            .unwrap()
    };
    send(&mut app, with_query("a=1")).await;
    assert!(send(&mut app, with_query("a=1")).await.replayed());
    send(&mut app, with_query("a=2"))
        .await
        .assert_problem(422, "key-reused");
    assert_eq!(probe.executions(), 1);
}

#[tokio::test]
async fn headers_do_not_count_towards_the_fingerprint() {
    let (mut app, _) = app(IdempotencyLayer::new());
    send(&mut app, request(Some("k"), BODY, &[("x-trace", "1")])).await;
    assert!(
        send(&mut app, request(Some("k"), BODY, &[("x-trace", "2")]))
            .await
            .replayed()
    );
}

#[tokio::test]
async fn a_disabled_fingerprint_replays_whatever_the_payload() {
    let (mut app, probe) = app(IdempotencyLayer::new().fingerprint(Fingerprint::disabled()));
    send(&mut app, request(Some("k"), BODY, &[])).await;
    assert!(send(&mut app, request(Some("k"), "something else", &[]))
        .await
        .replayed());
    assert_eq!(probe.executions(), 1);
}

#[tokio::test]
async fn a_custom_fingerprint_chooses_its_inputs() {
    let fingerprint = Fingerprint::custom(|parts, hasher| {
        hasher.update(
            parts
                .headers
                .get("api-version")
                .map_or(&b""[..], |v| v.as_bytes()),
        );
    })
    .without_body();
    let (mut app, probe) = app(IdempotencyLayer::new().fingerprint(fingerprint));
    send(&mut app, request(Some("k"), BODY, &[("api-version", "1")])).await;
    assert!(send(
        &mut app,
        request(Some("k"), "other body", &[("api-version", "1")])
    )
    .await
    .replayed());
    send(&mut app, request(Some("k"), BODY, &[("api-version", "2")]))
        .await
        .assert_problem(422, "key-reused");
    assert_eq!(probe.executions(), 1);
}

#[tokio::test]
async fn large_streamed_bodies_are_fingerprinted_whole() {
    const SIZE: usize = 40 * 1024 * 1024;
    let (mut app, probe) = app(IdempotencyLayer::new().max_duplicate_body(SIZE as u64));
    let big = |last: u8| {
        Request::post("/payments")
            .header("idempotency-key", "big")
            .body(Body::new(ChunkedBody::new(SIZE, 16 * 1024, b'x', last)))
            .unwrap()
    };
    let first = send(&mut app, big(b'x')).await;
    assert_eq!(
        first.json()["body_len"],
        SIZE,
        "the handler saw the whole body"
    );
    assert!(send(&mut app, big(b'x')).await.replayed());
    // Differs in the very last byte only.
    send(&mut app, big(b'y'))
        .await
        .assert_problem(422, "key-reused");
    assert_eq!(probe.executions(), 1);
}

#[tokio::test]
async fn a_handler_that_reads_part_of_the_body_still_gets_a_whole_fingerprint() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    let partial = |last: u8| {
        Request::post("/payments")
            .header("idempotency-key", "partial")
            .header("x-read", "1024")
            .body(Body::new(ChunkedBody::new(1024 * 1024, 1024, b'x', last)))
            .unwrap()
    };
    let first = send(&mut app, partial(b'x')).await;
    assert_eq!(first.json()["body_len"], 1024);
    assert!(send(&mut app, partial(b'x')).await.replayed());
    send(&mut app, partial(b'y'))
        .await
        .assert_problem(422, "key-reused");
    assert_eq!(probe.executions(), 1);
}

// 7. Duplicates.

#[tokio::test]
async fn a_replay_is_the_stored_response_marked_replayed() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    let first = send(
        &mut app,
        request(Some("k"), BODY, &[("x-request-id", "first")]),
    )
    .await;
    let retry = send(
        &mut app,
        request(Some("k"), BODY, &[("x-request-id", "second")]),
    )
    .await;
    assert_eq!(retry.status, first.status);
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.headers["content-type"], "application/json");
    assert_eq!(retry.headers["x-execution"], "1");
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(retry.headers["original-x-request-id"], "first");
    assert!(first.headers.get("idempotent-replayed").is_none());
    assert_eq!(probe.executions(), 1);
}

#[tokio::test]
async fn a_store_that_keeps_records_decoded_replays_the_same_answer_every_time() {
    let retries = |store: MemoryStore| async move {
        let (mut app, probe) = app(IdempotencyLayer::with_store(store));
        let first = request(Some("k"), BODY, &[("x-request-id", "first")]);
        assert!(!send(&mut app, first).await.replayed());
        let mut retries = Vec::new();
        for n in 0..3 {
            let id = format!("retry-{n}");
            let retry = send(&mut app, request(Some("k"), BODY, &[("x-request-id", &id)])).await;
            retries.push((retry.status, retry.headers, retry.body));
        }
        assert_eq!(probe.executions(), 1);
        retries
    };
    let decoding = retries(MemoryStore::builder().keep_decoded(false).build()).await;
    let kept = retries(MemoryStore::builder().keep_decoded(true).build()).await;
    assert_eq!(decoding[0].1["original-x-request-id"], "first");
    for retry in &kept {
        assert_eq!(
            retry, &decoding[0],
            "every replay, the first (decoding) and the later (copying)"
        );
    }
}

#[tokio::test]
async fn a_store_that_keeps_records_decoded_replays_an_omitted_body_as_the_decoding_one() {
    // The kept form holds a replay's marks (`idempotent-replayed`, the omitted-body marker in
    // place of `content-type`) from its first replay on; every replay must still read as one
    // decoded afresh.
    let retries = |store: MemoryStore| async move {
        let layer = IdempotencyLayer::with_store(store).max_stored_body(64 * 1024);
        let (mut app, probe) = app(layer);
        let oversized = |id: &str| {
            request(
                Some("k"),
                BODY,
                &[("x-response-bytes", "200000"), ("x-request-id", id)],
            )
        };
        assert!(!send(&mut app, oversized("first")).await.replayed());
        let mut retries = Vec::new();
        for n in 0..3 {
            let retry = send(&mut app, oversized(&format!("retry-{n}"))).await;
            retries.push((retry.status, retry.headers, retry.body));
        }
        assert_eq!(probe.executions(), 1);
        retries
    };
    let decoding = retries(MemoryStore::builder().keep_decoded(false).build()).await;
    let kept = retries(MemoryStore::builder().keep_decoded(true).build()).await;
    assert_eq!(decoding[0].1["idempotent-body-omitted"], "true");
    assert!(!decoding[0].1.contains_key("content-type"));
    assert_eq!(decoding[0].1["original-x-request-id"], "first");
    for retry in &kept {
        assert_eq!(
            retry, &decoding[0],
            "the first replay (decoding) and the later (copying)"
        );
        assert_eq!(
            retry.1.get_all("idempotent-replayed").iter().count(),
            1,
            "marked once, not once per replay"
        );
    }
}

#[tokio::test]
async fn carried_request_headers_are_configurable() {
    let layer = IdempotencyLayer::new()
        .carry_request_headers([HeaderName::from_static("x-correlation-id")]);
    let (mut app, _) = app(layer);
    send(
        &mut app,
        request(
            Some("k"),
            BODY,
            &[("x-correlation-id", "c1"), ("x-request-id", "r1")],
        ),
    )
    .await;
    let retry = send(&mut app, request(Some("k"), BODY, &[])).await;
    assert_eq!(retry.headers["original-x-correlation-id"], "c1");
    assert!(retry.headers.get("original-x-request-id").is_none());
}

#[tokio::test]
async fn a_duplicate_of_a_running_request_gets_409_with_retry_after() {
    let (app, probe) = app(IdempotencyLayer::new().retry_after(Duration::from_secs(3)));
    let original = tokio::spawn({
        let mut app = app.clone();
        async move { send(&mut app, request(Some("k"), BODY, &[("x-hold", "1")])).await }
    });
    probe.started(1).await;
    let mut app2 = app.clone();
    let conflict = send(&mut app2, request(Some("k"), BODY, &[])).await;
    conflict.assert_problem(409, "in-flight");
    assert_eq!(conflict.headers["retry-after"], "3");
    probe.release_held(1);
    assert_eq!(original.await.unwrap().status, 201);
    assert!(send(&mut app2, request(Some("k"), BODY, &[]))
        .await
        .replayed());
    assert_eq!(probe.executions(), 1);
}

/// `Retry-After` on 409 never asks a client to wait longer than the original's lease still
/// runs: past it the key is free (or taken over), so a later retry would waste time.
#[tokio::test]
async fn retry_after_on_409_is_bounded_by_the_lease_remaining() {
    let (app, probe) = app(IdempotencyLayer::with_settings(
        Settings::default().lease(Duration::from_secs(4)),
    )
    .retry_after(Duration::from_secs(30)));
    let original = tokio::spawn({
        let mut app = app.clone();
        async move { send(&mut app, request(Some("k"), BODY, &[("x-hold", "1")])).await }
    });
    probe.started(1).await;
    let conflict = send(&mut app.clone(), request(Some("k"), BODY, &[])).await;
    conflict.assert_problem(409, "in-flight");
    let after: u64 = conflict.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=4).contains(&after),
        "Retry-After {after} s with a 4 s lease"
    );
    probe.release_held(1);
    assert_eq!(original.await.unwrap().status, 201);
}

#[tokio::test]
async fn waiting_duplicates_get_the_original_response() {
    let (app, probe) = app(IdempotencyLayer::with_settings(
        Settings::default().on_conflict(OnConflict::Wait(Duration::from_secs(30))),
    ));
    let original = tokio::spawn({
        let mut app = app.clone();
        async move { send(&mut app, request(Some("k"), BODY, &[("x-hold", "1")])).await }
    });
    probe.started(1).await;
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let mut app = app.clone();
            tokio::spawn(async move { send(&mut app, request(Some("k"), BODY, &[])).await })
        })
        .collect();
    tokio::task::yield_now().await;
    probe.release_held(1);
    let original = original.await.unwrap();
    for waiter in waiters {
        let answer = waiter.await.unwrap();
        assert!(answer.replayed());
        assert_eq!(answer.body, original.body);
    }
    assert_eq!(probe.executions(), 1);
}

#[tokio::test]
async fn a_waiting_duplicate_runs_the_request_when_the_original_fails() {
    let (app, probe) = app(IdempotencyLayer::with_settings(
        Settings::default().on_conflict(OnConflict::Wait(Duration::from_secs(30))),
    ));
    let original = tokio::spawn({
        let mut app = app.clone();
        async move {
            send(
                &mut app,
                request(Some("k"), BODY, &[("x-hold", "1"), ("x-status", "503")]),
            )
            .await
        }
    });
    probe.started(1).await;
    let waiter = tokio::spawn({
        let mut app = app.clone();
        async move { send(&mut app, request(Some("k"), BODY, &[])).await }
    });
    tokio::task::yield_now().await;
    probe.release_held(1);
    assert_eq!(original.await.unwrap().status, 503);
    let retried = waiter.await.unwrap();
    assert_eq!(retried.status, 201);
    assert!(
        !retried.replayed(),
        "the failed original left nothing to replay"
    );
    assert_eq!(probe.executions(), 2);
}

/// A store without notifications (the `Store::wait` default, as Redis and PostgreSQL use) is
/// re-checked with jittered backoff, never in a tight loop.
#[tokio::test(start_paused = true)]
async fn waiting_duplicates_back_off_instead_of_polling_the_store() {
    let store = FaultyStore::new();
    let layer = IdempotencyLayer::with_settings(
        Settings::new(store.clone()).on_conflict(OnConflict::Wait(Duration::from_secs(30))),
    );
    let (app, probe) = app(layer);
    let original = tokio::spawn({
        let mut app = app.clone();
        async move {
            send(
                &mut app,
                request(Some("k"), BODY, &[("x-delay-ms", "10000")]),
            )
            .await
        }
    });
    probe.started(1).await;
    let mut app2 = app.clone();
    let started = tokio::time::Instant::now();
    assert!(send(&mut app2, request(Some("k"), BODY, &[]))
        .await
        .replayed());
    assert!(started.elapsed() >= Duration::from_secs(9));
    original.await.unwrap();
    // Ten seconds of waiting: backoff from 10 ms, capped at 500 ms (a mean of 250 ms).
    let claims = store.claims.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (5..100).contains(&claims),
        "{claims} claims in 10 s of waiting"
    );
}

#[tokio::test(start_paused = true)]
async fn waiting_is_bounded_then_409() {
    let (app, probe) = app(IdempotencyLayer::with_settings(
        Settings::default().on_conflict(OnConflict::Wait(Duration::from_secs(5))),
    ));
    let _original = tokio::spawn({
        let mut app = app.clone();
        async move { send(&mut app, request(Some("k"), BODY, &[("x-hold", "1")])).await }
    });
    probe.started(1).await;
    let started = tokio::time::Instant::now();
    let mut app2 = app.clone();
    send(&mut app2, request(Some("k"), BODY, &[]))
        .await
        .assert_problem(409, "in-flight");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_failing_store_fails_closed_with_503_and_the_handler_does_not_run() {
    let store = FaultyStore::new();
    let (mut app, probe) = app(IdempotencyLayer::with_store(store.clone()));
    store.set(Fault::Fail);
    let answer = send(&mut app, request(Some("k"), BODY, &[])).await;
    answer.assert_problem(503, "store-unavailable");
    assert_eq!(answer.headers["retry-after"], "1");
    assert!(
        !String::from_utf8_lossy(&answer.body).contains("hunter2"),
        "store internals never leak"
    );
    assert_eq!(probe.executions(), 0);
    // Keyless requests do not touch the store.
    assert_eq!(send(&mut app, request(None, BODY, &[])).await.status, 201);
    // Once the store is back, keyed requests work again.
    store.set(Fault::None);
    assert_eq!(
        send(&mut app, request(Some("k"), BODY, &[])).await.status,
        201
    );
}

#[tokio::test(start_paused = true)]
async fn a_store_that_fails_after_the_handler_ran_still_gives_the_client_its_answer() {
    let store = FaultyStore::new();
    let (app, probe) = app(IdempotencyLayer::with_settings(
        Settings::new(store.clone()).lease(Duration::from_secs(60)),
    ));
    let original = tokio::spawn({
        let mut app = app.clone();
        async move { send(&mut app, request(Some("k"), BODY, &[("x-hold", "1")])).await }
    });
    probe.started(1).await;
    // The store goes away while the handler runs: the outcome cannot be stored yet.
    store.set(Fault::Fail);
    probe.release_held(1);
    let answer = original.await.unwrap();
    assert_eq!(answer.status, 201, "the client gets the handler's answer");
    let mut app2 = app.clone();
    send(&mut app2, request(Some("k"), BODY, &[]))
        .await
        .assert_problem(503, "store-unavailable");
    // The store is back: the completion, retried in the background, lands; the retry
    // replays the first outcome. No second execution, ever (not after the lease either).
    store.set(Fault::None);
    let mut retry = send(&mut app2, request(Some("k"), BODY, &[])).await;
    while retry.status == 409 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        retry = send(&mut app2, request(Some("k"), BODY, &[])).await;
    }
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, answer.body);
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(send(&mut app2, request(Some("k"), BODY, &[]))
        .await
        .replayed());
    assert_eq!(probe.executions(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hung_store_answers_503_after_the_store_timeout() {
    let store = FaultyStore::new();
    let (mut app, probe) = app(IdempotencyLayer::with_settings(
        Settings::new(store.clone()).store_timeout(Duration::from_secs(2)),
    ));
    store.set(Fault::Hang);
    let started = tokio::time::Instant::now();
    send(&mut app, request(Some("k"), BODY, &[]))
        .await
        .assert_problem(503, "store-unavailable");
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(probe.executions(), 0);
}

#[tokio::test]
async fn fail_open_runs_the_handler_without_idempotency() {
    let store = FaultyStore::new();
    let (mut app, probe) =
        app(IdempotencyLayer::with_store(store.clone()).on_store_error(OnStoreError::FailOpen));
    store.set(Fault::Fail);
    for _ in 0..2 {
        assert_eq!(
            send(&mut app, request(Some("k"), BODY, &[])).await.status,
            201
        );
    }
    assert_eq!(probe.executions(), 2);
}

// 8. The handler finishes.

#[tokio::test]
async fn error_answers_release_the_key_so_a_corrected_retry_runs() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    for status in ["400", "404", "500", "503"] {
        let key = format!("k-{status}");
        let failed = send(&mut app, request(Some(&key), BODY, &[("x-status", status)])).await;
        assert_eq!(failed.status.as_str(), status);
        let retry = send(&mut app, request(Some(&key), r#"{"corrected":true}"#, &[])).await;
        assert_eq!(retry.status, 201);
        assert!(!retry.replayed());
        assert!(
            send(&mut app, request(Some(&key), r#"{"corrected":true}"#, &[]))
                .await
                .replayed()
        );
    }
    assert_eq!(probe.executions(), 8);
}

#[tokio::test]
async fn the_store_policy_is_configurable() {
    let (mut app, probe) =
        app(IdempotencyLayer::new().store_status(|status| status.as_u16() < 600));
    send(&mut app, request(Some("k"), BODY, &[("x-status", "500")])).await;
    let retry = send(&mut app, request(Some("k"), BODY, &[])).await;
    assert!(retry.replayed());
    assert_eq!(retry.status, 500);
    assert_eq!(probe.executions(), 1);
}

#[tokio::test]
async fn no_store_responses_release_the_key() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    for how in ["header", "extension"] {
        let key = format!("k-{how}");
        send(&mut app, request(Some(&key), BODY, &[("x-no-store", how)])).await;
        assert!(!send(&mut app, request(Some(&key), BODY, &[]))
            .await
            .replayed());
    }
    assert_eq!(probe.executions(), 4);
}

#[tokio::test]
async fn set_cookie_and_hop_by_hop_headers_are_never_replayed() {
    let (mut app, _) = app(IdempotencyLayer::new());
    let first = send(&mut app, request(Some("k"), BODY, &[("x-set-cookie", "1")])).await;
    assert!(
        first.headers.contains_key("set-cookie"),
        "the original answer keeps its cookie"
    );
    let retry = send(&mut app, request(Some("k"), BODY, &[])).await;
    assert!(retry.replayed());
    assert!(!retry.headers.contains_key("set-cookie"));
    assert!(!retry.headers.contains_key("connection"));
}

#[tokio::test]
async fn oversized_responses_pass_through_and_a_duplicate_gets_the_status_without_the_body() {
    let (mut app, probe) = app(IdempotencyLayer::new().max_stored_body(64 * 1024));
    let size = "200000";
    let first = send(
        &mut app,
        request(Some("k"), BODY, &[("x-response-bytes", size)]),
    )
    .await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body.len(), 200_000, "the client gets the whole body");
    let retry = send(
        &mut app,
        request(Some("k"), BODY, &[("x-response-bytes", size)]),
    )
    .await;
    assert_eq!(retry.status, 201);
    assert!(retry.replayed());
    assert_eq!(retry.headers["idempotent-body-omitted"], "true");
    assert!(retry.body.is_empty());
    assert!(!retry.headers.contains_key("content-type"));
    assert_eq!(probe.executions(), 1, "never a silent second execution");
}

#[tokio::test]
async fn a_response_just_under_the_limit_is_stored_whole() {
    let (mut app, _) = app(IdempotencyLayer::new().max_stored_body(64 * 1024));
    let first = send(
        &mut app,
        request(Some("k"), BODY, &[("x-response-bytes", "65536")]),
    )
    .await;
    let retry = send(&mut app, request(Some("k"), BODY, &[])).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
}

#[tokio::test(start_paused = true)]
async fn records_are_kept_for_the_ttl_then_the_key_runs_again() {
    let (mut app, probe) = app(IdempotencyLayer::with_settings(
        Settings::default().ttl(Duration::from_secs(3600)),
    ));
    send(&mut app, request(Some("k"), BODY, &[])).await;
    tokio::time::advance(Duration::from_secs(3599)).await;
    assert!(send(&mut app, request(Some("k"), BODY, &[]))
        .await
        .replayed());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(!send(&mut app, request(Some("k"), BODY, &[]))
        .await
        .replayed());
    assert_eq!(probe.executions(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_lease_is_renewed_while_a_slow_handler_runs() {
    let (app, probe) = app(IdempotencyLayer::with_settings(
        Settings::default().lease(Duration::from_secs(3)),
    ));
    let original = tokio::spawn({
        let mut app = app.clone();
        // Ten leases long.
        async move {
            send(
                &mut app,
                request(Some("k"), BODY, &[("x-delay-ms", "30000")]),
            )
            .await
        }
    });
    probe.started(1).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let mut app2 = app.clone();
    send(&mut app2, request(Some("k"), BODY, &[]))
        .await
        .assert_problem(409, "in-flight");
    original.await.unwrap();
    assert!(send(&mut app2, request(Some("k"), BODY, &[]))
        .await
        .replayed());
    assert_eq!(probe.executions(), 1);
}

// 9. Cancellation and panics.

#[tokio::test]
async fn a_dropped_request_still_runs_to_completion_and_is_replayed() {
    let (app, probe) = app(IdempotencyLayer::with_settings(
        Settings::default().on_conflict(OnConflict::Wait(Duration::from_secs(30))),
    ));
    let mut first = app.clone();
    let call = tokio::spawn(async move {
        send(&mut first, request(Some("k"), BODY, &[("x-hold", "1")])).await
    });
    probe.started(1).await;
    // The client goes away while the handler runs.
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    probe.release_held(1);
    let mut app2 = app.clone();
    // The detached handler finishes and stores its response; the retry waits for it.
    let retry = send(&mut app2, request(Some("k"), BODY, &[])).await;
    assert!(retry.replayed());
    assert_eq!(probe.executions(), 1);
    assert_eq!(probe.finished(), 1);
}

#[tokio::test]
async fn a_panicking_handler_answers_500_and_releases_the_key() {
    let (mut app, probe) = app(IdempotencyLayer::new());
    send(&mut app, request(Some("k"), BODY, &[("x-panic", "1")]))
        .await
        .assert_problem(500, "handler-panicked");
    let retry = send(&mut app, request(Some("k"), BODY, &[])).await;
    assert_eq!(retry.status, 201);
    assert!(!retry.replayed());
    assert_eq!(probe.executions(), 2);
}
