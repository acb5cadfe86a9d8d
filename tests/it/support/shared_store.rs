//! Cases only shared stores have: several handles (as several instances hold), and a server
//! that goes away and comes back.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Barrier;
use tower_idempotency::store::conformance::fresh_key;
use tower_idempotency::store::{ClaimOutcome, Record, Store, StoreError};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

/// Hundreds of claims on one key from two handles at the same instant: exactly one wins.
pub async fn two_handles_race_for_one_key<St: Store + Clone>(a: &St, b: &St) {
    const PER_HANDLE: usize = 100;
    for round in 0..5 {
        let key = Arc::new(fresh_key(&format!("fleet-race-{round}")));
        let barrier = Arc::new(Barrier::new(2 * PER_HANDLE));
        let winners = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for store in [a, b] {
            for _ in 0..PER_HANDLE {
                let (store, key, barrier, winners) =
                    (store.clone(), key.clone(), barrier.clone(), winners.clone());
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    match store.claim(&key, LEASE).await.unwrap() {
                        ClaimOutcome::Claimed(_) => {
                            winners.fetch_add(1, Ordering::SeqCst);
                        }
                        ClaimOutcome::InFlight { .. } => {}
                        ClaimOutcome::Completed(_) => panic!("nobody completed"),
                    }
                }));
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            winners.load(Ordering::SeqCst),
            1,
            "round {round}: exactly one of {} claims wins",
            2 * PER_HANDLE
        );
    }
}

/// A lease whose owner stopped renewing lapses; another handle takes the key over; the old
/// owner's late completion is refused and the new owner's record stands.
pub async fn lapsed_lease_is_taken_over_by_another_instance<St: Store>(a: &St, b: &St) {
    let key = fresh_key("fleet-lapse");
    let ClaimOutcome::Claimed(old) = a.claim(&key, Duration::from_millis(1000)).await.unwrap()
    else {
        panic!()
    };
    assert!(matches!(
        b.claim(&key, LEASE).await.unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ClaimOutcome::Claimed(new) = b.claim(&key, LEASE).await.unwrap() else {
        panic!("the lapsed lease is taken over")
    };
    assert!(matches!(
        a.complete(&key, &old, Record::new(None, "late"), TTL).await,
        Err(StoreError::LeaseLost)
    ));
    b.complete(&key, &new, Record::new(None, "new owner"), TTL)
        .await
        .unwrap();
    for store in [a, b] {
        match store.claim(&key, LEASE).await.unwrap() {
            ClaimOutcome::Completed(record) => assert_eq!(record.payload(), "new owner"),
            other => panic!("{other:?}"),
        }
    }
}

/// A record written through one connection is read through a brand-new one.
pub async fn records_survive_a_reconnect<St: Store>(
    first: St,
    connect: impl std::future::Future<Output = St>,
) {
    let key = fresh_key("fleet-reconnect");
    let ClaimOutcome::Claimed(token) = first.claim(&key, LEASE).await.unwrap() else {
        panic!()
    };
    first
        .complete(&key, &token, Record::new(Some(9), "kept"), TTL)
        .await
        .unwrap();
    drop(first);
    let second = connect.await;
    match second.claim(&key, LEASE).await.unwrap() {
        ClaimOutcome::Completed(record) => {
            assert_eq!(record.payload(), "kept");
            assert_eq!(record.fingerprint(), Some(9));
        }
        other => panic!("{other:?}"),
    }
}

/// The server goes away: calls fail with a store error (bounded, never hanging). It comes
/// back: the same handle works again, without being rebuilt.
pub async fn outage_then_recovery<St: Store>(
    store: &St,
    stop: impl FnOnce(),
    start: impl FnOnce(),
) {
    let key = fresh_key("outage-before");
    assert!(matches!(
        store.claim(&key, LEASE).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    stop();
    let during = tokio::time::timeout(
        Duration::from_secs(15),
        store.claim(&fresh_key("outage-during"), LEASE),
    )
    .await
    .expect("a store call during an outage must not hang");
    assert!(matches!(during, Err(StoreError::Backend(_))), "{during:?}");
    start();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match store.claim(&fresh_key("outage-after"), LEASE).await {
            Ok(ClaimOutcome::Claimed(_)) => break,
            Ok(other) => panic!("{other:?}"),
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no recovery: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A duplicate waiting on another handle (another instance) is woken by the store's
/// notification when the claim ends: within milliseconds, where backing off would take up to
/// 500 ms (and a missed notification about 2 s). Five rounds, each well inside 150 ms.
pub async fn a_waiter_on_another_handle_is_woken_when_the_claim_ends<St: Store + Clone>(
    a: &St,
    b: &St,
) {
    // Start b's listener and give it time to subscribe.
    let _ = tokio::time::timeout(Duration::from_millis(300), b.wait(&fresh_key("warm"), 0)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..5 {
        let key = fresh_key(&format!("wake-{round}"));
        let ClaimOutcome::Claimed(token) = a.claim(&key, LEASE).await.unwrap() else {
            panic!()
        };
        let waiter = tokio::spawn({
            let (b, key) = (b.clone(), key.clone());
            async move {
                b.wait(&key, 6).await;
                std::time::Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ended = std::time::Instant::now();
        if round % 2 == 0 {
            a.complete(&key, &token, Record::new(None, "done"), TTL)
                .await
                .unwrap();
        } else {
            a.release(&key, &token).await.unwrap();
        }
        let woken = waiter.await.unwrap();
        let lag = woken.saturating_duration_since(ended);
        assert!(
            lag < Duration::from_millis(150),
            "round {round}: woken {lag:?} after the claim ended"
        );
    }
}

/// A store made before its server answers (`connect_lazy`): keyed requests get 503 while the
/// server is down, and work once `start` brought it up, without a new store.
pub async fn a_lazy_store_works_once_its_server_is_up<St: Store + Clone>(
    store: St,
    start: impl FnOnce(),
) {
    use crate::support::{app, request, send};
    let (mut app, probe) = app(tower_idempotency::IdempotencyLayer::with_store(store));
    send(&mut app, request(Some("early"), "{}", &[]))
        .await
        .assert_problem(503, "store-unavailable");
    start();
    let started = std::time::Instant::now();
    let answer = loop {
        let answer = send(&mut app, request(Some("early"), "{}", &[])).await;
        if answer.status != 503 {
            break answer;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answer.status, 201);
    assert_eq!(probe.executions(), 1);
}

/// A 10,000-character scope (a long tenant id, a JWT subject) through the layer: stored and
/// replayed like any other, whatever the backend's limits on key length.
pub async fn a_very_long_scope_works<St: Store + Clone>(store: St) {
    use crate::support::{app, request, send};
    // Random, so that no backend can compress it below its limits.
    let scope: String = (0..320).map(|i| fresh_key(&i.to_string())).collect();
    assert!(scope.len() >= 10_000);
    let layer =
        tower_idempotency::IdempotencyLayer::with_store(store).scope(move |_| Some(scope.clone()));
    let (mut app, probe) = app(layer);
    let key = fresh_key("long-scope").replace('/', "-");
    assert_eq!(
        send(&mut app, request(Some(&key), "{}", &[])).await.status,
        201
    );
    assert!(send(&mut app, request(Some(&key), "{}", &[]))
        .await
        .replayed());
    assert_eq!(probe.executions(), 1);
}

/// Generates, in the calling test file, one test per conformance check and per shared-store
/// case, each on `store()` (an `async fn() -> Option<Store>` of that file; `None` skips).
#[macro_export]
macro_rules! shared_store_suite {
    () => {
        tower_idempotency::store_conformance_tests!(conformance, optional: store());

        /// Every promise of live streams (`conformance::streams`): this store keeps them.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn live_streams() {
            use tower_idempotency::store::conformance::{streams, StreamSupport};
            let Some(store) = store().await else { return };
            assert_eq!(streams(&store).await, StreamSupport::Checked);
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn two_instances_racing_for_one_key_have_one_winner() {
            let (Some(a), Some(b)) = (store().await, store().await) else { return };
            support::shared_store::two_handles_race_for_one_key(&a, &b).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn a_lapsed_lease_is_taken_over_by_another_instance_and_fenced() {
            let (Some(a), Some(b)) = (store().await, store().await) else { return };
            support::shared_store::lapsed_lease_is_taken_over_by_another_instance(&a, &b).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_waiter_on_another_instance_is_woken_when_the_claim_ends() {
            let (Some(a), Some(b)) = (store().await, store().await) else { return };
            support::shared_store::a_waiter_on_another_handle_is_woken_when_the_claim_ends(&a, &b).await;
        }

        #[tokio::test]
        async fn a_very_long_scope_works() {
            let Some(store) = store().await else { return };
            support::shared_store::a_very_long_scope_works(store).await;
        }

        #[tokio::test]
        async fn records_survive_a_reconnect() {
            let Some(first) = store().await else { return };
            support::shared_store::records_survive_a_reconnect(first, async { store().await.unwrap() }).await;
        }
    };
}
