//! The memory store's recovery points share the store's byte capacity with its records: no
//! fixed table that one tenant can fill for everyone, a point never dropped while its key's
//! claim is alive, and a save that cannot be kept refused.

use std::time::Duration;

use tower_idempotency::store::{
    ClaimOutcome, MemoryStore, OwnerToken, Record, RecoveryPoint, Store, StoreError,
};

const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(24 * 3600);

async fn claimed(store: &MemoryStore, key: &str, lease: Duration) -> OwnerToken {
    match store.claim(key, lease).await.unwrap() {
        ClaimOutcome::Claimed(token) => token,
        other => panic!("expected a claim of {key}, got {other:?}"),
    }
}

/// A run of `key` that saves `point` after its side effect, then fails (the layer releases
/// the key); what the save answered.
async fn failed_run(
    store: &MemoryStore,
    key: &str,
    point: &RecoveryPoint,
) -> Result<(), StoreError> {
    let token = claimed(store, key, LEASE).await;
    let saved = store.save_point(key, &token, point, TTL).await;
    store.release(key, &token).await.unwrap();
    saved
}

/// The point the next run of `key` finds.
async fn next_run_finds(store: &MemoryStore, key: &str) -> Option<RecoveryPoint> {
    let token = claimed(store, key, LEASE).await;
    let found = store.load_point(key, &token).await.unwrap();
    store.release(key, &token).await.unwrap();
    found
}

/// Issue 42, case 3: one tenant's 80,000 failed runs (each saving a point) left the store's
/// fixed table of 65,536 points full for 24 hours, and every other tenant's save after its
/// charge was refused. Now every save is kept, and each victim's retry finds its point.
#[tokio::test]
async fn one_tenant_s_failed_points_never_refuse_another_tenant_s_save() {
    let store = MemoryStore::new();
    let noise = RecoveryPoint::new("charged", "ch_mallory");
    for i in 0..80_000 {
        let key = format!("mallory|POST|/payments|{i:08}");
        let _ = failed_run(&store, &key, &noise).await;
    }
    let mut refused = Vec::new();
    let mut lost = Vec::new();
    for i in 0..20 {
        let key = format!("acme|POST|/payments|order-{i}");
        let point = RecoveryPoint::new("charged", format!("ch_acme_{i}"));
        if let Err(error) = failed_run(&store, &key, &point).await {
            refused.push(format!("{key}: {error}"));
        } else if next_run_finds(&store, &key).await != Some(point) {
            lost.push(key);
        }
    }
    assert!(refused.is_empty(), "saves refused: {refused:?}");
    assert!(lost.is_empty(), "points the retry did not find: {lost:?}");
}

/// Points weigh on the capacity like records: a store filled with failed runs' points stays
/// within its capacity, evicting the least recently used.
#[tokio::test]
async fn points_are_charged_to_the_capacity() {
    let capacity = 64 * 1024;
    let store = MemoryStore::builder().max_bytes(capacity).build();
    let empty = store.weighted_size();
    let point = RecoveryPoint::new("charged", vec![b'x'; 1000]);
    failed_run(&store, "first", &point).await.unwrap();
    assert!(
        store.weighted_size() >= empty + 1000 + "charged".len() as u64 + "first".len() as u64,
        "a kept point is charged: {} bytes",
        store.weighted_size()
    );
    for i in 0..1000 {
        failed_run(&store, &format!("key-{i}"), &point)
            .await
            .unwrap();
    }
    assert!(
        store.weighted_size() <= capacity,
        "{} bytes charged",
        store.weighted_size()
    );
    assert!(store.record_count() < 1000, "older points were evicted");
    assert_eq!(next_run_finds(&store, "key-999").await, Some(point));
}

/// A point saved just before the store comes under pressure (a claim alive, records and other
/// points evicting everything cold) is not lost while its claim lives: its run reads it, and
/// after the run fails the retry still finds it.
#[tokio::test]
async fn a_point_is_kept_while_its_claim_lives_whatever_the_pressure() {
    let store = MemoryStore::builder().max_bytes(64 * 1024).build();
    let point = RecoveryPoint::new("charged", "ch_1");
    let token = claimed(&store, "acme", LEASE).await;
    store.save_point("acme", &token, &point, TTL).await.unwrap();
    let noise = RecoveryPoint::new("charged", vec![b'x'; 1000]);
    for i in 0..500 {
        let key = format!("record-{i}");
        let other = claimed(&store, &key, LEASE).await;
        let record = Record::new(None, vec![b'r'; 1000]);
        store.complete(&key, &other, record, TTL).await.unwrap();
        failed_run(&store, &format!("point-{i}"), &noise)
            .await
            .unwrap();
    }
    assert_eq!(
        store.load_point("acme", &token).await.unwrap(),
        Some(point.clone()),
        "its own run reads it"
    );
    store.release("acme", &token).await.unwrap();
    assert_eq!(next_run_finds(&store, "acme").await, Some(point));
}

/// The same when the run's lease lapses instead (its task hung or was dropped): the run that
/// takes the key over finds the point, however many records and points came in between.
#[tokio::test(start_paused = true)]
async fn a_point_outlives_pressure_until_a_lapsed_claim_is_taken_over() {
    let store = MemoryStore::builder().max_bytes(64 * 1024).build();
    let point = RecoveryPoint::new("charged", "ch_1");
    let token = claimed(&store, "acme", Duration::from_secs(1)).await;
    store.save_point("acme", &token, &point, TTL).await.unwrap();
    let noise = RecoveryPoint::new("charged", vec![b'x'; 1000]);
    for i in 0..500 {
        failed_run(&store, &format!("point-{i}"), &noise)
            .await
            .unwrap();
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    // Enough abandoned claims in its shard for the sweep of lapsed claims to run.
    for i in 0..5000 {
        claimed(&store, &format!("abandoned-{i}"), Duration::from_secs(1)).await;
    }
    tokio::time::advance(Duration::from_secs(2)).await;
    for i in 0..5000 {
        claimed(&store, &format!("later-{i}"), LEASE).await;
    }
    assert_eq!(next_run_finds(&store, "acme").await, Some(point));
}

/// A point the store could never keep once its claim ends (larger than its whole capacity) is
/// refused, so the handler knows; nothing is saved.
#[tokio::test]
async fn a_point_larger_than_the_capacity_is_refused() {
    let store = MemoryStore::builder().max_bytes(4096).build();
    let token = claimed(&store, "k", LEASE).await;
    let point = RecoveryPoint::new("charged", vec![b'x'; 8192]);
    match store.save_point("k", &token, &point, TTL).await {
        Err(StoreError::Backend(error)) => {
            assert!(error.to_string().contains("capacity"), "{error}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(store.load_point("k", &token).await.unwrap(), None);
    store.release("k", &token).await.unwrap();
}

/// A claim that races the release of a run whose point was evicted from the cache meanwhile
/// (its lock-free look before the release writes the point back, its lock after) still takes
/// the point on: exactly one racer claims the key each round, and it finds the point.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_racing_a_release_takes_the_point_on() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const RACERS: usize = 3;
    const ROUNDS: usize = 1000;
    let store = MemoryStore::builder().max_bytes(64 * 1024).build();
    let point = RecoveryPoint::new("charged", "ch_1");
    let (mut winners, mut found) = (0, 0);
    for round in 0..ROUNDS {
        let key: Arc<str> = format!("race-{round}").into();
        let owner = claimed(&store, &key, LEASE).await;
        store.save_point(&key, &owner, &point, TTL).await.unwrap();
        // Pressure that evicts the point's entry: only the claim holds it now.
        for i in 0..80 {
            let other = format!("pressure-{round}-{i}");
            let token = claimed(&store, &other, LEASE).await;
            let record = Record::new(None, vec![b'r'; 1000]);
            store.complete(&other, &token, record, TTL).await.unwrap();
        }
        let barrier = Arc::new(tokio::sync::Barrier::new(RACERS + 1));
        let done = Arc::new(AtomicBool::new(false));
        let racers: Vec<_> = (0..RACERS)
            .map(|_| {
                let (store, key, barrier, done) =
                    (store.clone(), key.clone(), barrier.clone(), done.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    while !done.load(Ordering::Acquire) {
                        match store.claim(&key, LEASE).await.unwrap() {
                            ClaimOutcome::InFlight { .. } => tokio::task::yield_now().await,
                            ClaimOutcome::Claimed(token) => {
                                let point = store.load_point(&key, &token).await.unwrap();
                                done.store(true, Ordering::Release);
                                return Some(point);
                            }
                            ClaimOutcome::Completed(_) => panic!("nothing was completed"),
                        }
                    }
                    None
                })
            })
            .collect();
        barrier.wait().await;
        store.release(&key, &owner).await.unwrap();
        for racer in racers {
            if let Some(loaded) = racer.await.unwrap() {
                winners += 1;
                found += usize::from(loaded.as_ref() == Some(&point));
            }
        }
    }
    assert_eq!(winners, ROUNDS, "one claim per round");
    assert_eq!(found, ROUNDS, "every winner took the point on");
}

/// Issue 42, case 3 through the layer, as a payments API meets it: a handler that charges
/// unless a point says it already did, saves the charge's point (answering 503 if the save
/// fails), and sometimes fails after it. One tenant's 80,000 failed payments must not make
/// another tenant's failed payment charge again on its retry: 20 payments, 20 charges.
#[tokio::test]
async fn through_the_layer_one_tenant_s_failures_never_make_another_charge_twice() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{HeaderMap, Request, StatusCode};
    use axum::routing::post;
    use axum::{Extension, Router};
    use tower::ServiceExt;
    use tower_idempotency::{IdempotencyLayer, RecoveryPoints};

    let charges = Arc::new(AtomicU64::new(0));
    let handler = {
        let charges = charges.clone();
        move |Extension(points): Extension<RecoveryPoints>, headers: HeaderMap| {
            let charges = charges.clone();
            async move {
                if points.load().await.unwrap().is_none() {
                    charges.fetch_add(1, Ordering::Relaxed);
                    if points.save("charged", "ch_1").await.is_err() {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                }
                if headers.contains_key("x-fail") {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::CREATED
                }
            }
        }
    };
    let layer = IdempotencyLayer::with_store(MemoryStore::new()).scope(|parts| {
        let tenant = parts.headers.get("x-tenant")?;
        Some(tenant.to_str().ok()?.to_owned())
    });
    let app = tower::Layer::layer(&layer, Router::new().route("/payments", post(handler)));
    let pay = |tenant: &str, key: String, fail: bool| {
        let mut request = Request::post("/payments")
            .header("x-tenant", tenant)
            .header("idempotency-key", key);
        if fail {
            request = request.header("x-fail", "1");
        }
        let request = request.body(Body::from("{\"amount\":1}")).unwrap();
        let app = app.clone();
        async move { app.oneshot(request).await.unwrap().status() }
    };
    for i in 0..80_000 {
        pay("mallory", format!("m-{i}"), true).await;
    }
    let before = charges.load(Ordering::Relaxed);
    let mut answers = Vec::new();
    for i in 0..20 {
        let failed = pay("acme", format!("order-{i}"), true).await;
        let retried = pay("acme", format!("order-{i}"), false).await;
        answers.push((failed.as_u16(), retried.as_u16()));
    }
    assert_eq!(
        charges.load(Ordering::Relaxed) - before,
        20,
        "20 payments, each charged once; answers {answers:?}"
    );
    assert!(answers.iter().all(|a| *a == (500, 201)), "{answers:?}");
}
