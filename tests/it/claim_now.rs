//! A store that claims at once (`Store::claim_now`): the layer asks it first, on the request's
//! own task, and goes to `claim_as` only when it does not answer.

use crate::support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tower_idempotency::store::{ClaimOutcome, MemoryStore, OwnerToken, Record, Store, StoreError};
use tower_idempotency::IdempotencyLayer;

const BODY: &str = r#"{"amount":100}"#;

/// A memory store that counts how it is asked to claim, and whose `claim_now` can be made to
/// panic (a bug in a store) or to decline (a store that cannot answer at once).
#[derive(Clone, Default)]
struct AtOnce {
    inner: MemoryStore,
    now_calls: Arc<AtomicUsize>,
    async_calls: Arc<AtomicUsize>,
    panic: Arc<AtomicBool>,
    decline: Arc<AtomicBool>,
}

impl Store for AtOnce {
    async fn claim_as(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        self.async_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.claim_as(key, token, lease).await
    }

    fn claim_now(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Option<Result<ClaimOutcome, StoreError>> {
        self.now_calls.fetch_add(1, Ordering::SeqCst);
        if self.panic.load(Ordering::SeqCst) {
            panic!("a bug in the store's claim_now");
        }
        if self.decline.load(Ordering::SeqCst) {
            return None;
        }
        self.inner.claim_now(key, token, lease)
    }

    async fn renew(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &str,
        token: &OwnerToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(key, token, record, ttl).await
    }

    async fn release(&self, key: &str, token: &OwnerToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
}

#[tokio::test]
async fn a_store_that_claims_at_once_is_asked_once_per_request_and_never_through_claim_as() {
    let store = AtOnce::default();
    let (mut app, probe) = app(IdempotencyLayer::with_store(store.clone()));
    let first = send(&mut app, request(Some("k"), BODY, &[])).await;
    assert_eq!(first.status, 201);
    assert!(!first.replayed());
    for _ in 0..3 {
        let retry = send(&mut app, request(Some("k"), BODY, &[])).await;
        assert!(retry.replayed());
        assert_eq!(retry.body, first.body);
    }
    // A reused key with another payload is still refused, on the same path.
    send(&mut app, request(Some("k"), r#"{"amount":999}"#, &[]))
        .await
        .assert_problem(422, "key-reused");
    assert_eq!(probe.executions(), 1);
    assert_eq!(store.now_calls.load(Ordering::SeqCst), 5);
    assert_eq!(store.async_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_store_that_declines_to_claim_at_once_is_claimed_through_claim_as() {
    let store = AtOnce::default();
    store.decline.store(true, Ordering::SeqCst);
    let (mut app, probe) = app(IdempotencyLayer::with_store(store.clone()));
    send(&mut app, request(Some("k"), BODY, &[])).await;
    assert!(send(&mut app, request(Some("k"), BODY, &[]))
        .await
        .replayed());
    assert_eq!(probe.executions(), 1);
    assert_eq!(store.now_calls.load(Ordering::SeqCst), 2);
    assert_eq!(store.async_calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_panic_in_claim_now_answers_500_and_leaves_the_key_free() {
    let store = AtOnce::default();
    let (mut app, probe) = app(IdempotencyLayer::with_store(store.clone()));
    store.panic.store(true, Ordering::SeqCst);
    send(&mut app, request(Some("k"), BODY, &[]))
        .await
        .assert_problem(500, "handler-panicked");
    assert_eq!(probe.executions(), 0, "nothing ran on a claim that failed");
    store.panic.store(false, Ordering::SeqCst);
    let retry = send(&mut app, request(Some("k"), BODY, &[])).await;
    assert_eq!(retry.status, 201);
    assert!(!retry.replayed(), "the panic claimed nothing");
    assert_eq!(probe.executions(), 1);
}

#[tokio::test]
async fn a_duplicate_claimed_at_once_while_the_original_runs_gets_409() {
    let store = AtOnce::default();
    let (app, probe) = app(IdempotencyLayer::with_store(store.clone()));
    let mut original = app.clone();
    let running = tokio::spawn(async move {
        send(&mut original, request(Some("k"), BODY, &[("x-hold", "1")])).await
    });
    probe.started(1).await;
    let mut duplicate = app.clone();
    send(&mut duplicate, request(Some("k"), BODY, &[]))
        .await
        .assert_problem(409, "in-flight");
    probe.release_held(1);
    assert_eq!(running.await.unwrap().status, 201);
    assert!(send(&mut duplicate, request(Some("k"), BODY, &[]))
        .await
        .replayed());
    assert_eq!(probe.executions(), 1);
    assert_eq!(store.async_calls.load(Ordering::SeqCst), 0);
}
