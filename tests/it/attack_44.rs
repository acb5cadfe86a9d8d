//! Attacks on issue 44's landing (a hostile client, a careless operator): Redis waiter marks
//! (claim format 2) racing completion, renew and a lapsed lease's take-over, on Redis (the
//! completion script) and Valkey (`SET … IFEQ`); a point a retry never loads, seen by a run
//! after the record expired; PostgreSQL schema 4's waiter flag racing the completion, and
//! `purge_at` under TTLs that differ from the store's latest; `migrate()` run concurrently.
//! A wait longer than 1.5 s is a lost wake-up (the polling bound is about 2 s).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support;

use support::servers::{postgres_url, redis_url, valkey_url};
use tokio::sync::Barrier;
use tower_idempotency::store::{
    ClaimOutcome, KeyState, OwnerToken, PostgresStore, Record, RecoveryPoint, RedisStore, Store,
    StoreError,
};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(600);
const LOST: Duration = Duration::from_millis(1500);
const ROUNDS: usize = 25;

fn hostile_key(case: &str) -> String {
    format!("t|{{{case}}}|}}{{x|{:016x}", fastrand::u64(..))
}

async fn claimed<S: Store>(store: &S, key: &str, lease: Duration) -> OwnerToken {
    match store.claim(key, lease).await.expect("claim") {
        ClaimOutcome::Claimed(token) => token,
        other => panic!("{key}: expected a fresh claim, got {other:?}"),
    }
}

/// `ROUNDS` races of a waiter (on `waiter`, another store instance: another process's
/// subscriber/listener) against the owner's completion (on `owner`), released by one barrier;
/// with `renew`, the owner renews its (maybe marked) lease first. Returns the slow waits.
async fn race_waits<S: Store + Clone>(owner: S, waiter: S, renew: bool) -> Vec<(usize, Duration)> {
    let mut slow = Vec::new();
    for round in 0..ROUNDS {
        let key = hostile_key(&format!("race{round}"));
        let token = claimed(&owner, &key, LEASE).await;
        let barrier = Arc::new(Barrier::new(2));
        let (w, b, k) = (waiter.clone(), barrier.clone(), key.clone());
        let waiting = tokio::spawn(async move {
            b.wait().await;
            let started = Instant::now();
            w.wait(&k, 0).await;
            started.elapsed()
        });
        barrier.wait().await;
        // Spread the completion across the waiter's register/mark/wait window.
        for _ in 0..(round % 5) {
            tokio::task::yield_now().await;
        }
        if round % 7 == 3 {
            tokio::time::sleep(Duration::from_millis(5 * (round as u64 % 4))).await;
        }
        if renew {
            owner
                .renew(&key, &token, LEASE)
                .await
                .expect("renew a marked claim");
        }
        owner
            .complete(&key, &token, Record::new(Some(1), "done"), TTL)
            .await
            .expect("complete");
        let waited = waiting.await.unwrap();
        if waited > LOST {
            slow.push((round, waited));
        }
        assert!(matches!(
            waiter.inspect(&key).await.unwrap(),
            KeyState::Completed { .. }
        ));
    }
    slow
}

// ---------------------------------------------------------------- Redis / Valkey

async fn redis_pair(url: &str, prefix: &str) -> (RedisStore, RedisStore) {
    let a = RedisStore::connect(url).await.unwrap().with_prefix(prefix);
    let b = RedisStore::connect(url).await.unwrap().with_prefix(prefix);
    (a, b)
}

/// A waiter on another instance marks the claim while the owner completes (script on Redis,
/// `IFEQ` on Valkey): no race loses the wake-up; keys and prefix hold `{`, `}`, `|`.
#[tokio::test]
async fn redis_mark_racing_completion_loses_no_wake_up() {
    for url in [redis_url(), valkey_url()].into_iter().flatten() {
        let (a, b) = redis_pair(&url, "att{44}|").await;
        let slow = race_waits(a.clone(), b.clone(), false).await;
        assert!(
            slow.is_empty(),
            "{url}: lost wake-ups (round, wait): {slow:?}"
        );
        let slow = race_waits(a, b, true).await;
        assert!(
            slow.is_empty(),
            "{url}: lost wake-ups after renew: {slow:?}"
        );
    }
}

/// A marked claim whose lease lapsed and was taken over: the lapsed owner's completion,
/// renew, release and point save all fail, write nothing and leave the successor's claim
/// (and its point) alone; the successor completes, and the waiter that marked the old claim
/// sees the record. On both completion paths.
#[tokio::test]
async fn redis_marked_claim_lapsed_then_taken_over_fences_the_old_owner() {
    for url in [redis_url(), valkey_url()].into_iter().flatten() {
        let (a, b) = redis_pair(&url, "att44|{x}").await;
        let key = hostile_key("lapsed");
        let short = Duration::from_millis(300);
        let old = claimed(&a, &key, short).await;
        a.save_point(&key, &old, &RecoveryPoint::new("charged", "ch_old"), TTL)
            .await
            .unwrap();
        // The waiter marks the old claim, then waits (woken at its bound or by the successor).
        let (w, k) = (b.clone(), key.clone());
        let waiter = tokio::spawn(async move {
            let started = Instant::now();
            loop {
                w.wait(&k, 0).await;
                if let KeyState::Completed { record, .. } = w.inspect(&k).await.unwrap() {
                    return (started.elapsed(), record);
                }
            }
        });
        // Let the mark land, then the lease lapse.
        tokio::time::sleep(short + Duration::from_millis(200)).await;
        let new = claimed(&b, &key, LEASE).await;
        b.save_point(&key, &new, &RecoveryPoint::new("charged", "ch_new"), TTL)
            .await
            .unwrap();
        assert!(
            matches!(a.renew(&key, &old, LEASE).await, Err(StoreError::LeaseLost)),
            "{url}: the lapsed owner renews the successor's claim"
        );
        assert!(
            matches!(
                a.complete(&key, &old, Record::new(Some(1), "old"), TTL)
                    .await,
                Err(StoreError::LeaseLost)
            ),
            "{url}: the lapsed owner completes over the successor"
        );
        assert!(
            matches!(a.release(&key, &old).await, Err(StoreError::LeaseLost)),
            "{url}: the lapsed owner releases the successor's claim"
        );
        assert!(a
            .save_point(&key, &old, &RecoveryPoint::new("charged", "ch_evil"), TTL)
            .await
            .is_err());
        assert_eq!(
            b.load_point(&key, &new)
                .await
                .unwrap()
                .map(|p| p.data().clone()),
            Some(bytes::Bytes::from_static(b"ch_new")),
            "{url}: the successor's point"
        );
        assert!(matches!(
            a.inspect(&key).await.unwrap(),
            KeyState::InFlight { .. }
        ));
        b.complete(&key, &new, Record::new(Some(1), "new"), TTL)
            .await
            .unwrap();
        let (waited, record) = waiter.await.unwrap();
        assert_eq!(record, Record::new(Some(1), "new"), "{url}");
        assert!(waited < Duration::from_secs(5), "{url}: waited {waited:?}");
    }
}

/// Hostile operator: a retry on another instance takes over a crashed run's key and never
/// loads its point (a handler that stopped using points); its record's TTL is shorter than
/// the point's. Once the record expired, a new run of the key must not resume the crashed
/// run's point (it would skip the charge, or answer the old charge as its own). PostgreSQL's
/// completion deletes the point whoever completes; Redis's only when the completer loaded it.
async fn stale_point_after_record_expiry<S: Store>(a: S, b: S, what: &str) -> Option<String> {
    let key = hostile_key("stale");
    let lease = Duration::from_millis(300);
    let crashed = claimed(&a, &key, lease).await;
    a.save_point(&key, &crashed, &RecoveryPoint::new("charged", "ch_1"), TTL)
        .await
        .unwrap();
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    let retry = claimed(&b, &key, lease).await;
    b.complete(
        &key,
        &retry,
        Record::new(Some(1), "ok"),
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(matches!(b.inspect(&key).await.unwrap(), KeyState::Absent));
    let later = claimed(&b, &key, LEASE).await;
    let point = b.load_point(&key, &later).await.unwrap();
    point.map(|p| format!("{what}: a run of the key after its record expired resumed the crashed run's point {p:?}"))
}

#[tokio::test]
async fn redis_a_run_after_the_record_expired_resumes_no_stale_point() {
    let Some(url) = redis_url() else { return };
    let (a, b) = redis_pair(&url, "att44p:").await;
    let stale = stale_point_after_record_expiry(a, b, "redis (script)").await;
    assert_eq!(stale, None);
}

#[tokio::test]
async fn valkey_a_run_after_the_record_expired_resumes_no_stale_point() {
    let Some(url) = valkey_url() else { return };
    let (a, b) = redis_pair(&url, "att44p:").await;
    let stale = stale_point_after_record_expiry(a, b, "valkey (IFEQ)").await;
    assert_eq!(stale, None);
}

#[tokio::test]
async fn postgres_a_run_after_the_record_expired_resumes_no_stale_point() {
    let Some(url) = postgres_url() else { return };
    let table = format!("att44_stale_{}", std::process::id());
    let a = pg_store(&url, &table).await;
    let b = pg_store(&url, &table).await;
    let stale = stale_point_after_record_expiry(a, b, "postgres").await;
    assert_eq!(stale, None);
}

// ---------------------------------------------------------------- PostgreSQL schema 4

async fn pg_store(url: &str, table: &str) -> PostgresStore {
    let store = PostgresStore::connect(url)
        .await
        .expect("connect")
        .with_table(table)
        .unwrap();
    store.migrate().await.expect("migrate");
    store
}

/// The first waiter's flag racing the completion, on another store instance (its own
/// listener): no wake-up is lost.
#[tokio::test]
async fn postgres_waiter_flag_racing_completion_loses_no_wake_up() {
    let Some(url) = postgres_url() else { return };
    let table = format!("att44_wake_{}", std::process::id());
    let a = pg_store(&url, &table).await;
    let b = pg_store(&url, &table).await;
    let slow = race_waits(a.clone(), b.clone(), false).await;
    assert!(slow.is_empty(), "lost wake-ups (round, wait): {slow:?}");
    let slow = race_waits(a, b, true).await;
    assert!(slow.is_empty(), "lost wake-ups after renew: {slow:?}");
}

/// `purge_at` is set from the TTL of the store's latest completion: a record completed with
/// a longer TTL than that is not purged before its expiry (its purge is rescheduled), and a
/// record with a shorter TTL is never replayed past it.
#[tokio::test]
async fn postgres_purge_at_never_purges_early_nor_replays_late() {
    let Some(url) = postgres_url() else { return };
    let table = format!("att44_purge_{}", std::process::id());
    let store = pg_store(&url, &table).await;
    let short = Duration::from_millis(800);
    let lease = Duration::from_millis(500);
    // The store's latest completion: a short TTL.
    let k0 = hostile_key("p0");
    let t0 = claimed(&store, &k0, lease).await;
    store
        .complete(&k0, &t0, Record::new(None, "a"), short)
        .await
        .unwrap();
    // Claimed now: purge_at ≈ lease + short. Completed with an hour.
    let long_key = hostile_key("long");
    let t1 = claimed(&store, &long_key, lease).await;
    store
        .complete(
            &long_key,
            &t1,
            Record::new(Some(9), "keep"),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    // Then a long TTL becomes the latest, and a key claimed now gets a far purge_at, but
    // is completed with the short TTL.
    let short_key = hostile_key("short");
    let t2 = claimed(&store, &short_key, lease).await;
    store
        .complete(&short_key, &t2, Record::new(Some(3), "gone"), short)
        .await
        .unwrap();
    tokio::time::sleep(lease + short + Duration::from_millis(400)).await;
    let purged = store.purge_expired(1000).await.unwrap();
    assert!(
        matches!(
            store.inspect(&long_key).await.unwrap(),
            KeyState::Completed { .. }
        ),
        "a record with a longer TTL than the claim foresaw was purged early (purge saw {purged})"
    );
    assert!(
        matches!(store.inspect(&short_key).await.unwrap(), KeyState::Absent),
        "an expired record still reads"
    );
    assert!(
        matches!(
            store.claim(&short_key, LEASE).await.unwrap(),
            ClaimOutcome::Claimed(_)
        ),
        "an expired record was replayed past its TTL"
    );
    // Purged again: the rescheduled row stays, twice.
    store.purge_expired(1000).await.unwrap();
    store.purge_expired(1000).await.unwrap();
    let KeyState::Completed { record, .. } = store.inspect(&long_key).await.unwrap() else {
        panic!("the long record was purged by a rescheduled purge")
    };
    assert_eq!(record, Record::new(Some(9), "keep"));
}

/// A careless operator starts many instances at once on a fresh table: every `migrate()`
/// succeeds, run concurrently and again.
#[tokio::test]
async fn postgres_migrate_concurrently_and_twice() {
    let Some(url) = postgres_url() else { return };
    let table = format!("att44_mig_{}", std::process::id());
    let mut stores = Vec::new();
    for _ in 0..6 {
        stores.push(
            PostgresStore::connect(&url)
                .await
                .unwrap()
                .with_table(&table)
                .unwrap(),
        );
    }
    let barrier = Arc::new(Barrier::new(stores.len()));
    let tasks: Vec<_> = stores
        .iter()
        .cloned()
        .map(|s| {
            let b = barrier.clone();
            tokio::spawn(async move {
                b.wait().await;
                s.migrate().await
            })
        })
        .collect();
    let mut errors = Vec::new();
    for task in tasks {
        if let Err(error) = task.await.unwrap() {
            errors.push(format!("{error:?}"));
        }
    }
    assert!(errors.is_empty(), "concurrent migrate() failed: {errors:?}");
    stores[0].migrate().await.expect("migrate twice");
    let key = hostile_key("mig");
    let token = claimed(&stores[1], &key, LEASE).await;
    stores[2]
        .complete(&key, &token, Record::new(None, "x"), TTL)
        .await
        .unwrap();
}
