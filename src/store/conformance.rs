//! The conformance suite every [`Store`] must pass (feature `conformance`).
//!
//! Each check is a public async function taking the store under test; [`run_all`] runs them
//! all, and [`store_conformance_tests!`](crate::store_conformance_tests) turns them into one
//! `#[tokio::test]` each. Every check uses fresh random keys, so one store (even a shared
//! server) can run them all concurrently. Time-based checks use short real leases and TTLs
//! (a few seconds in all, run concurrently); they work under tokio's paused clock too.
//!
//! ```
//! use tower_idempotency::store::{conformance, MemoryStore};
//!
//! # #[tokio::main]
//! # async fn main() {
//! conformance::run_all(&MemoryStore::new()).await;
//! # }
//! ```
//!
//! In a test file of your own store:
//!
//! ```ignore
//! tower_idempotency::store_conformance_tests!(my_store_conformance, async { MyStore::connect().await });
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{
    ClaimOutcome, KeyState, OwnerToken, Record, RecoveryPoint, Store, StoreError, StreamRead,
};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);
/// Short enough to wait for in a test, long enough for a round trip to a server.
const SHORT: Duration = Duration::from_millis(1000);

/// A key no other check (or earlier run) uses.
pub fn fresh_key(case: &str) -> String {
    format!("conformance/{case}/{:032x}", fastrand::u128(..))
}

async fn claim_owned<St: Store>(store: &St, key: &str, lease: Duration) -> OwnerToken {
    match store.claim(key, lease).await.expect("claim") {
        ClaimOutcome::Claimed(token) => token,
        other => panic!("expected to claim {key}, got {other:?}"),
    }
}

fn assert_in_flight(outcome: ClaimOutcome) {
    assert!(
        matches!(outcome, ClaimOutcome::InFlight { .. }),
        "expected in flight, got {outcome:?}"
    );
}

fn assert_lease_lost(result: Result<(), StoreError>, what: &str) {
    assert!(
        matches!(result, Err(StoreError::LeaseLost)),
        "{what}: expected LeaseLost, got {result:?}"
    );
}

/// A fresh key is claimed; a second claim sees it in flight.
pub async fn claim_then_in_flight<St: Store>(store: &St) {
    let key = fresh_key("claim");
    claim_owned(store, &key, LEASE).await;
    assert_in_flight(store.claim(&key, LEASE).await.unwrap());
    assert_in_flight(store.claim(&key, LEASE).await.unwrap());
}

/// A completed key returns its record (fingerprint and binary payload intact) to every claim.
pub async fn complete_then_replay<St: Store>(store: &St) {
    let key = fresh_key("complete");
    let token = claim_owned(store, &key, LEASE).await;
    // Not UTF-8, with NULs: stores must be binary-safe.
    let payload = Bytes::from((0..=255u8).cycle().take(70_000).collect::<Vec<u8>>());
    let record = Record::new(Some(u128::MAX - 7), payload.clone());
    store
        .complete(&key, &token, record.clone(), TTL)
        .await
        .unwrap();
    for _ in 0..2 {
        match store.claim(&key, LEASE).await.unwrap() {
            ClaimOutcome::Completed(got) => assert_eq!(got, record),
            other => panic!("expected the record, got {other:?}"),
        }
    }
    let key = fresh_key("complete-none");
    let token = claim_owned(store, &key, LEASE).await;
    store
        .complete(&key, &token, Record::new(None, Bytes::new()), TTL)
        .await
        .unwrap();
    match store.claim(&key, LEASE).await.unwrap() {
        ClaimOutcome::Completed(got) => {
            assert_eq!(got.fingerprint(), None);
            assert!(got.payload().is_empty());
        }
        other => panic!("expected the record, got {other:?}"),
    }
}

/// A released key is claimed again, with a new token.
pub async fn release_then_reclaim<St: Store>(store: &St) {
    let key = fresh_key("release");
    let first = claim_owned(store, &key, LEASE).await;
    store.release(&key, &first).await.unwrap();
    let second = claim_owned(store, &key, LEASE).await;
    assert_ne!(first, second, "a new claim must get a new token");
}

/// Complete, renew and release with a token that does not own the key are refused and change
/// nothing; a token is spent once its claim completed.
pub async fn owner_checks<St: Store>(store: &St) {
    let key = fresh_key("owner");
    let token = claim_owned(store, &key, LEASE).await;
    let stranger = OwnerToken::random();
    assert_lease_lost(
        store
            .complete(&key, &stranger, Record::new(None, "x"), TTL)
            .await,
        "complete by a stranger",
    );
    assert_lease_lost(
        store.renew(&key, &stranger, LEASE).await,
        "renew by a stranger",
    );
    assert_lease_lost(
        store.release(&key, &stranger).await,
        "release by a stranger",
    );
    assert_in_flight(store.claim(&key, LEASE).await.unwrap());

    store
        .complete(&key, &token, Record::new(None, "first"), TTL)
        .await
        .unwrap();
    assert_lease_lost(
        store
            .complete(&key, &token, Record::new(None, "second"), TTL)
            .await,
        "second complete",
    );
    assert_lease_lost(store.release(&key, &token).await, "release after complete");
    assert_lease_lost(
        store.renew(&key, &token, LEASE).await,
        "renew after complete",
    );
    match store.claim(&key, LEASE).await.unwrap() {
        ClaimOutcome::Completed(record) => assert_eq!(record.payload(), "first"),
        other => panic!("expected the first record, got {other:?}"),
    }

    let unclaimed = fresh_key("owner-unclaimed");
    assert_lease_lost(
        store
            .complete(&unclaimed, &token, Record::new(None, "x"), TTL)
            .await,
        "complete of an unclaimed key",
    );
    assert!(matches!(
        store.claim(&unclaimed, LEASE).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
}

/// A lease that lapses is taken over by the next claim; the old owner can then neither
/// complete, renew nor release, and the new owner's record stands.
pub async fn lapsed_lease_is_taken_over_and_fenced<St: Store>(store: &St) {
    let key = fresh_key("lapse");
    let old = claim_owned(store, &key, SHORT).await;
    tokio::time::sleep(SHORT * 2).await;
    let new = claim_owned(store, &key, LEASE).await;
    assert_ne!(old, new);
    assert_lease_lost(
        store
            .complete(&key, &old, Record::new(None, "late"), TTL)
            .await,
        "late complete",
    );
    assert_lease_lost(store.renew(&key, &old, LEASE).await, "late renew");
    assert_lease_lost(store.release(&key, &old).await, "late release");
    store
        .complete(&key, &new, Record::new(None, "new owner"), TTL)
        .await
        .unwrap();
    match store.claim(&key, LEASE).await.unwrap() {
        ClaimOutcome::Completed(record) => assert_eq!(record.payload(), "new owner"),
        other => panic!("expected the new owner's record, got {other:?}"),
    }
}

/// Renewal keeps a claim alive past its first lease.
pub async fn renew_extends_the_lease<St: Store>(store: &St) {
    let key = fresh_key("renew");
    let token = claim_owned(store, &key, SHORT).await;
    // Renewed every quarter lease, with room for a slow round trip.
    for _ in 0..6 {
        tokio::time::sleep(SHORT / 4).await;
        store.renew(&key, &token, SHORT).await.unwrap();
    }
    // 1.5 leases after the claim: only renewal keeps it.
    assert_in_flight(store.claim(&key, LEASE).await.unwrap());
    store
        .complete(&key, &token, Record::new(None, "done"), TTL)
        .await
        .unwrap();
}

/// A record is gone after its TTL: the next claim runs.
pub async fn record_expires_after_ttl<St: Store>(store: &St) {
    let key = fresh_key("ttl");
    let token = claim_owned(store, &key, LEASE).await;
    store
        .complete(&key, &token, Record::new(None, "short-lived"), SHORT)
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&key, LEASE).await.unwrap(),
        ClaimOutcome::Completed(_)
    ));
    tokio::time::sleep(SHORT * 2).await;
    claim_owned(store, &key, LEASE).await;
}

/// Keys do not interfere.
pub async fn keys_are_independent<St: Store>(store: &St) {
    let a = fresh_key("independent-a");
    let b = fresh_key("independent-b");
    let token = claim_owned(store, &a, LEASE).await;
    claim_owned(store, &b, LEASE).await;
    store
        .complete(&a, &token, Record::new(None, "a"), TTL)
        .await
        .unwrap();
    assert_in_flight(store.claim(&b, LEASE).await.unwrap());
}

/// Many tasks claiming one key at the same instant: exactly one wins, every other sees it in
/// flight. Run it on a multi-threaded runtime for a real race.
pub async fn concurrent_claims_have_one_winner<St: Store + Clone>(store: &St) {
    const TASKS: usize = 64;
    for round in 0..5 {
        let key = Arc::new(fresh_key(&format!("race-{round}")));
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let winners = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
                let (winners, in_flight) = (winners.clone(), in_flight.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    match store.claim(&key, LEASE).await.unwrap() {
                        ClaimOutcome::Claimed(_) => winners.fetch_add(1, Ordering::SeqCst),
                        ClaimOutcome::InFlight { .. } => in_flight.fetch_add(1, Ordering::SeqCst),
                        ClaimOutcome::Completed(_) => panic!("nobody completed"),
                    };
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(winners.load(Ordering::SeqCst), 1, "exactly one claim wins");
        assert_eq!(in_flight.load(Ordering::SeqCst), TASKS - 1);
    }
}

/// A store that claims at once ([`Store::claim_now`]) answers as `claim_as` does, and the two
/// are atomic together: of many racing claims, half made at once and half not, exactly one
/// wins. A store that never claims at once (the default) passes.
pub async fn claim_now_answers_as_claim_as<St: Store + Clone>(store: &St) {
    let key = fresh_key("now");
    let token = OwnerToken::random();
    let Some(first) = store.claim_now(&key, &token, LEASE) else {
        return;
    };
    match first.expect("claim at once") {
        ClaimOutcome::Claimed(owner) => assert_eq!(owner, token, "claimed for the given token"),
        other => panic!("expected to claim {key} at once, got {other:?}"),
    }
    let again = store.claim_now(&key, &OwnerToken::random(), LEASE);
    assert_in_flight(
        again
            .expect("a store that claims at once answers every time")
            .unwrap(),
    );
    assert_in_flight(store.claim(&key, LEASE).await.unwrap());
    let record = Record::new(Some(7), Bytes::from_static(b"done"));
    store
        .complete(&key, &token, record.clone(), TTL)
        .await
        .unwrap();
    match store.claim_now(&key, &OwnerToken::random(), LEASE) {
        Some(Ok(ClaimOutcome::Completed(got))) => assert_eq!(got, record),
        other => panic!("expected the record at once, got {other:?}"),
    }
    let key = fresh_key("now-release");
    let released = claim_owned(store, &key, LEASE).await;
    store.release(&key, &released).await.unwrap();
    let token = OwnerToken::random();
    match store.claim_now(&key, &token, LEASE) {
        Some(Ok(ClaimOutcome::Claimed(owner))) => assert_eq!(owner, token),
        other => panic!("expected to claim a released key at once, got {other:?}"),
    }

    const TASKS: usize = 64;
    let key = Arc::new(fresh_key("now-race"));
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let winners = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (store, key, barrier, winners) =
                (store.clone(), key.clone(), barrier.clone(), winners.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let token = OwnerToken::random();
                let outcome = match task % 2 {
                    0 => store
                        .claim_now(&key, &token, LEASE)
                        .expect("answers at once"),
                    _ => store.claim_as(&key, &token, LEASE).await,
                };
                match outcome.unwrap() {
                    ClaimOutcome::Claimed(_) => {
                        winners.fetch_add(1, Ordering::SeqCst);
                    }
                    ClaimOutcome::InFlight { .. } => {}
                    ClaimOutcome::Completed(_) => panic!("nobody completed"),
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(winners.load(Ordering::SeqCst), 1, "exactly one claim wins");
}

/// A waiter returns soon after the claim it waits on completes (it never waits forever), and
/// at once for a key that is not in flight.
pub async fn wait_returns_when_the_claim_ends<St: Store + Clone>(store: &St) {
    let key = fresh_key("wait");
    tokio::time::timeout(Duration::from_secs(5), store.wait(&key, 0))
        .await
        .expect("waiting on a free key returns");
    let token = claim_owned(store, &key, LEASE).await;
    let waiter = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move {
            let mut attempt = 0;
            loop {
                match store.claim(&key, LEASE).await.unwrap() {
                    ClaimOutcome::Completed(record) => return record,
                    ClaimOutcome::InFlight { .. } => store.wait(&key, attempt).await,
                    ClaimOutcome::Claimed(_) => panic!("the key is held"),
                }
                attempt += 1;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    store
        .complete(&key, &token, Record::new(None, "done"), TTL)
        .await
        .unwrap();
    let record = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter sees the completion")
        .unwrap();
    assert_eq!(record.payload(), "done");
}

/// The operator calls: `inspect` reports each state; `delete` frees a key whoever holds it,
/// and fences the old owner. Stores that do not implement them (they answer
/// [`StoreError::Unsupported`]) pass this check.
pub async fn inspect_and_delete<St: Store>(store: &St) {
    let key = fresh_key("inspect");
    match store.inspect(&key).await {
        Err(StoreError::Unsupported(_)) => return,
        Ok(KeyState::Absent) => {}
        other => panic!("a fresh key is absent, got {other:?}"),
    }
    let token = claim_owned(store, &key, LEASE).await;
    match store.inspect(&key).await.unwrap() {
        KeyState::InFlight { lease_remaining } => {
            assert!(
                lease_remaining.is_none_or(|left| left <= LEASE),
                "{lease_remaining:?}"
            )
        }
        other => panic!("expected in flight, got {other:?}"),
    }
    store
        .complete(&key, &token, Record::new(Some(9), "done"), TTL)
        .await
        .unwrap();
    match store.inspect(&key).await.unwrap() {
        KeyState::Completed { record, expires_in } => {
            assert_eq!(record.payload(), "done");
            assert_eq!(record.fingerprint(), Some(9));
            assert!(expires_in.is_none_or(|left| left <= TTL), "{expires_in:?}");
        }
        other => panic!("expected completed, got {other:?}"),
    }
    assert!(store.delete(&key).await.unwrap(), "there was a record");
    assert!(matches!(
        store.inspect(&key).await.unwrap(),
        KeyState::Absent
    ));
    assert!(!store.delete(&key).await.unwrap(), "nothing left");
    // Deleting a stuck claim frees the key at once and fences its owner.
    let stuck = claim_owned(store, &key, LEASE).await;
    assert!(store.delete(&key).await.unwrap());
    let next = claim_owned(store, &key, LEASE).await;
    assert_lease_lost(
        store
            .complete(&key, &stuck, Record::new(None, "late"), TTL)
            .await,
        "the deleted claim's owner",
    );
    store.release(&key, &next).await.unwrap();
}

/// Whether `store` keeps recovery points: a first save by the owner of a fresh claim. Stores
/// that answer [`StoreError::Unsupported`] pass the recovery-point checks without them.
async fn keeps_points<St: Store>(store: &St, key: &str, token: &OwnerToken) -> bool {
    match store
        .save_point(key, token, &RecoveryPoint::new("first", "1"), TTL)
        .await
    {
        Err(StoreError::Unsupported(_)) => false,
        Ok(()) => true,
        Err(other) => panic!("the owner's first save failed: {other:?}"),
    }
}

fn assert_point(found: Result<Option<RecoveryPoint>, StoreError>, phase: &str, data: &str) {
    match found {
        Ok(Some(point)) => {
            assert_eq!(point.phase(), phase, "{point:?}");
            assert_eq!(point.data(), data.as_bytes(), "{point:?}");
        }
        other => panic!("expected the point {phase:?}, got {other:?}"),
    }
}

/// Recovery points are fenced by the owner token: once a lapsed lease was taken over, the old
/// holder can neither save (`LeaseLost`, nothing written) nor read; the point it saved before
/// the lapse survives for the new owner.
pub async fn recovery_points_are_fenced_by_the_owner<St: Store>(store: &St) {
    let key = fresh_key("point-fence");
    let old = claim_owned(store, &key, SHORT).await;
    if !keeps_points(store, &key, &old).await {
        return;
    }
    tokio::time::sleep(SHORT * 2).await;
    let new = claim_owned(store, &key, LEASE).await;
    assert_lease_lost(
        store
            .save_point(&key, &old, &RecoveryPoint::new("late", "2"), TTL)
            .await,
        "a save by the holder whose lease lapsed",
    );
    assert!(
        matches!(
            store.load_point(&key, &old).await,
            Err(StoreError::LeaseLost)
        ),
        "a read by the holder whose lease lapsed"
    );
    assert_point(store.load_point(&key, &new).await, "first", "1");
    store.release(&key, &new).await.unwrap();
}

/// A point survives a release (a failed run): the next owner reads it, and a save replaces it.
pub async fn recovery_points_survive_a_release<St: Store>(store: &St) {
    let key = fresh_key("point-release");
    let first = claim_owned(store, &key, LEASE).await;
    if !keeps_points(store, &key, &first).await {
        return;
    }
    store.release(&key, &first).await.unwrap();
    let second = claim_owned(store, &key, LEASE).await;
    assert_point(store.load_point(&key, &second).await, "first", "1");
    store
        .save_point(&key, &second, &RecoveryPoint::new("second", "2"), TTL)
        .await
        .unwrap();
    assert_point(store.load_point(&key, &second).await, "second", "2");
    let fresh = fresh_key("point-none");
    let token = claim_owned(store, &fresh, LEASE).await;
    assert!(
        matches!(store.load_point(&fresh, &token).await, Ok(None)),
        "a key without a point"
    );
    store.release(&fresh, &token).await.unwrap();
    store.release(&key, &second).await.unwrap();
}

/// A point ends with its key's completion (the record supersedes it: a later run of the key,
/// once the record expired, starts afresh) and with its own TTL.
pub async fn recovery_points_end_with_completion_and_ttl<St: Store>(store: &St) {
    let key = fresh_key("point-complete");
    let token = claim_owned(store, &key, LEASE).await;
    if !keeps_points(store, &key, &token).await {
        return;
    }
    store
        .complete(&key, &token, Record::new(None, "done"), SHORT)
        .await
        .unwrap();
    let short = fresh_key("point-ttl");
    let holder = claim_owned(store, &short, LEASE).await;
    store
        .save_point(&short, &holder, &RecoveryPoint::new("brief", "x"), SHORT)
        .await
        .unwrap();
    tokio::time::sleep(SHORT * 2).await;
    let next = claim_owned(store, &key, LEASE).await;
    assert!(
        matches!(store.load_point(&key, &next).await, Ok(None)),
        "the point of a completed key is gone"
    );
    assert!(
        matches!(store.load_point(&short, &holder).await, Ok(None)),
        "a point past its TTL is gone"
    );
    store.release(&key, &next).await.unwrap();
    store.release(&short, &holder).await.unwrap();
}

/// A point of 64 KiB (the layer's default limit), with any bytes, is kept exactly, with the
/// fingerprint it is bound to (and its absence); so is a phase of more than 65,535 bytes whose
/// last character straddles that length (a 16-bit length would cut it).
pub async fn recovery_points_hold_64_kib<St: Store>(store: &St) {
    let key = fresh_key("point-size");
    let token = claim_owned(store, &key, LEASE).await;
    if !keeps_points(store, &key, &token).await {
        return;
    }
    let data: Bytes = (0..64 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    let long_phase = format!("{}€", "a".repeat(65_534));
    for point in [
        RecoveryPoint::new("charged: ch_é", data.clone()),
        RecoveryPoint::new("charged", "ch_1").with_fingerprint(Some(u128::MAX - 1)),
        RecoveryPoint::new(long_phase, Bytes::new()).with_fingerprint(Some(1)),
    ] {
        store.save_point(&key, &token, &point, TTL).await.unwrap();
        let found = store.load_point(&key, &token).await.unwrap();
        assert_eq!(found.as_ref(), Some(&point));
        assert_eq!(found.unwrap().fingerprint(), point.fingerprint());
    }
    store.release(&key, &token).await.unwrap();
}

/// Keys shaped to collide inside a store that derives per-key state from part of the key:
/// keys sharing a Redis hash tag (`{…}`), tags that are empty or unclosed, braces alone, a key
/// that is another's prefix or suffix, keys spelling another key's internal names (`…:point`,
/// the Redis store's default record key of another key as a tag), and `|` (the separator of the
/// layer's composite keys). Distinct strings, all around one random `nonce`.
pub fn adversarial_keys(nonce: &str) -> Vec<String> {
    let n = nonce;
    vec![
        format!("order-{{{n}}}"),
        format!("x-{{{n}}}"),
        format!("{{{n}}}"),
        n.to_owned(),
        format!("{n}:point"),
        format!("{{{n}}}:point"),
        format!("{{idempotency:{n}}}"),
        format!("{{idempotency:{{{n}}}}}:point"),
        format!("{{}}{n}"),
        format!("{{}}{{{n}}}"),
        format!("{n}}}"),
        format!("}}{n}"),
        format!("{{{n}"),
        format!("{{{{{n}}}}}"),
        format!("{n}-x"),
        format!("x-{n}"),
        format!("{n}|x"),
        format!("|{n}"),
        format!("{n}\u{ff}"),
    ]
}

/// Distinct keys never share state, however they are shaped ([`adversarial_keys`]): each
/// has its own claim, record and recovery point. Half the keys save points and are released,
/// the other half complete; then every key still finds its own state and nothing of another's:
/// a point saved under one key is not seen under another (nor deleted by another's
/// completion), a completed key does not make another completed, and a claim does not hold
/// another key. A store may answer [`StoreError::Unsupported`] to points for some keys (a Redis
/// Cluster, for a key whose slot no hash tag can name), but then for both the save and the read.
pub async fn adversarial_keys_share_nothing<St: Store>(store: &St) {
    for writers in [0, 1] {
        let keys = adversarial_keys(&format!("{:032x}", fastrand::u128(..)));
        let writes = |i: usize| i % 2 == writers;
        let mut tokens = Vec::with_capacity(keys.len());
        for key in &keys {
            tokens.push(claim_owned(store, key, LEASE).await);
        }
        let mut has_point = vec![false; keys.len()];
        for (i, key) in keys.iter().enumerate().filter(|(i, _)| writes(*i)) {
            let point = RecoveryPoint::new(format!("phase-{i}"), format!("{i}"));
            match store.save_point(key, &tokens[i], &point, TTL).await {
                Ok(()) => has_point[i] = true,
                Err(StoreError::Unsupported(_)) => {}
                Err(other) => panic!("saving the point of {key:?}: {other:?}"),
            }
        }
        let own_point_or_none = |i: usize, found: Result<Option<RecoveryPoint>, StoreError>| {
            let key = &keys[i];
            match found {
                Ok(Some(point)) if has_point[i] => {
                    assert_eq!(
                        (point.phase(), &point.data()[..]),
                        (format!("phase-{i}").as_str(), format!("{i}").as_bytes()),
                        "{key:?} found another key's point"
                    );
                }
                Ok(None) | Err(StoreError::Unsupported(_)) if !has_point[i] => {}
                other => panic!(
                    "{key:?} (own point saved: {}): expected {}, got {other:?}",
                    has_point[i],
                    if has_point[i] {
                        "its own point"
                    } else {
                        "no point"
                    }
                ),
            }
        };
        for (i, key) in keys.iter().enumerate() {
            own_point_or_none(i, store.load_point(key, &tokens[i]).await);
        }
        for (i, key) in keys.iter().enumerate() {
            if writes(i) {
                store.release(key, &tokens[i]).await.unwrap();
            } else {
                let record = Record::new(Some(i as u128), format!("record-{i}"));
                store.complete(key, &tokens[i], record, TTL).await.unwrap();
            }
        }
        for (i, key) in keys.iter().enumerate() {
            match store.claim(key, LEASE).await.unwrap() {
                ClaimOutcome::Claimed(token) if writes(i) => {
                    own_point_or_none(i, store.load_point(key, &token).await);
                    let record = Record::new(Some(i as u128), format!("record-{i}"));
                    store.complete(key, &token, record, TTL).await.unwrap();
                }
                ClaimOutcome::Completed(record) if !writes(i) => {
                    assert_eq!(
                        record.payload(),
                        format!("record-{i}").as_bytes(),
                        "{key:?}"
                    );
                }
                other => panic!(
                    "{key:?}: expected {}, got {other:?}",
                    if writes(i) {
                        "a fresh claim (it was released)"
                    } else {
                        "its own record"
                    }
                ),
            }
        }
        for (i, key) in keys.iter().enumerate() {
            match store.claim(key, LEASE).await.unwrap() {
                ClaimOutcome::Completed(record) => {
                    assert_eq!(record.fingerprint(), Some(i as u128), "{key:?}");
                    assert_eq!(
                        record.payload(),
                        format!("record-{i}").as_bytes(),
                        "{key:?}"
                    );
                }
                other => panic!("{key:?}: expected its own record, got {other:?}"),
            }
        }
    }
}

/// What [`streams`] found: the store keeps live streams and passed every check, or it answers
/// [`StoreError::Unsupported`] to them (then nothing was checked, and duplicates on other
/// processes of a layer over it wait for the outcome instead of following the stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a store that answers Unsupported passed no stream check: assert which you expect"]
pub enum StreamSupport {
    /// Every stream check passed.
    Checked,
    /// The store answers [`StoreError::Unsupported`] to live streams: nothing was checked.
    Unsupported,
}

/// The promises of [`Store::append_stream`] and [`Store::read_stream`], kept apart from
/// [`run_all`] because a store may leave live streams out (the memory store does: its
/// duplicates follow a stream in memory). Runs every stream check and says whether the store
/// keeps streams at all; a store that answers [`StoreError::Unsupported`] to the first append
/// checks nothing (and says so on standard error): assert the answer you expect.
///
/// ```
/// use tower_idempotency::store::{conformance, MemoryStore};
///
/// # #[tokio::main]
/// # async fn main() {
/// let support = conformance::streams(&MemoryStore::new()).await;
/// assert_eq!(support, conformance::StreamSupport::Unsupported);
/// # }
/// ```
pub async fn streams<St: Store>(store: &St) -> StreamSupport {
    let key = fresh_key("stream-support");
    let token = claim_owned(store, &key, LEASE).await;
    let first = store
        .append_stream(&key, &token, 0, &[Bytes::from_static(b"0")], TTL)
        .await;
    store.release(&key, &token).await.unwrap();
    match first {
        Ok(()) => {}
        Err(StoreError::Unsupported(_)) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "conformance::streams: this store answers Unsupported to live streams: no stream check ran"
            );
            return StreamSupport::Unsupported;
        }
        Err(other) => panic!("the first append of a stream failed: {other:?}"),
    }
    stream_appends_are_owner_checked(store).await;
    stream_appends_are_idempotent_by_position(store).await;
    stream_takeover_replaces_the_stream(store).await;
    stream_ends_with_its_claim(store).await;
    stream_ends_after_its_ttl(store).await;
    stream_reads_are_capped(store).await;
    stream_of_10_mb_round_trips(store).await;
    stream_keys_share_nothing(store).await;
    StreamSupport::Checked
}

fn chunk(text: impl Into<String>) -> Bytes {
    Bytes::from(text.into())
}

/// The chunks of a live read, or a panic saying what came instead.
fn live(read: Result<StreamRead, StoreError>, what: &str) -> Vec<Bytes> {
    match read {
        Ok(StreamRead::Live(chunks)) => chunks,
        other => panic!("{what}: expected a live stream, got {other:?}"),
    }
}

fn assert_not_live(read: Result<StreamRead, StoreError>, what: &str) {
    assert!(
        matches!(read, Ok(StreamRead::NotLive)),
        "{what}: expected NotLive, got {read:?}"
    );
}

/// Every chunk of `key`'s live stream from `from` on, read as a joiner does (answer after
/// answer, until one brings nothing new).
async fn read_all<St: Store>(store: &St, key: &str, mut from: u64) -> Vec<Bytes> {
    let mut all = Vec::new();
    loop {
        let chunks = live(
            store.read_stream(key, from).await,
            "reading the stream whole",
        );
        if chunks.is_empty() {
            return all;
        }
        from += chunks.len() as u64;
        all.extend(chunks);
    }
}

/// Only the owner of a live claim appends (a stranger, a key never claimed: `LeaseLost`, and
/// nothing written); a key in flight without a stream reads `NotLive`, a key never claimed
/// `Absent`; the owner's chunks read back from any index.
pub async fn stream_appends_are_owner_checked<St: Store>(store: &St) {
    let key = fresh_key("stream-owner");
    let token = claim_owned(store, &key, LEASE).await;
    assert_not_live(
        store.read_stream(&key, 0).await,
        "claimed, nothing appended",
    );
    assert_lease_lost(
        store
            .append_stream(&key, &OwnerToken::random(), 0, &[chunk("x")], TTL)
            .await,
        "an append by a stranger",
    );
    assert_not_live(
        store.read_stream(&key, 0).await,
        "after a stranger's refused append",
    );
    let chunks = [chunk("a"), chunk(""), chunk("c\0\u{ff}")];
    store
        .append_stream(&key, &token, 0, &chunks, TTL)
        .await
        .unwrap();
    assert_eq!(live(store.read_stream(&key, 0).await, "from 0"), chunks);
    assert_eq!(
        live(store.read_stream(&key, 2).await, "from 2"),
        &chunks[2..]
    );
    assert!(live(store.read_stream(&key, 3).await, "from the end").is_empty());
    assert!(live(store.read_stream(&key, 9).await, "past the end").is_empty());
    let unclaimed = fresh_key("stream-unclaimed");
    assert_lease_lost(
        store
            .append_stream(&unclaimed, &token, 0, &[chunk("x")], TTL)
            .await,
        "an append to a key never claimed",
    );
    assert!(
        matches!(
            store.read_stream(&unclaimed, 0).await,
            Ok(StreamRead::Absent)
        ),
        "a key never claimed reads Absent"
    );
    store.release(&key, &token).await.unwrap();
}

/// A retried append (chunks the stream holds already, whole or in part) adds only what is new;
/// one that starts past the end (a gap) is refused with a backend error and adds nothing.
pub async fn stream_appends_are_idempotent_by_position<St: Store>(store: &St) {
    let key = fresh_key("stream-retry");
    let token = claim_owned(store, &key, LEASE).await;
    let all: Vec<Bytes> = (0..6).map(|i| chunk(format!("chunk-{i}"))).collect();
    store
        .append_stream(&key, &token, 0, &all[..2], TTL)
        .await
        .unwrap();
    // The same append again, then one that overlaps what is held.
    store
        .append_stream(&key, &token, 0, &all[..2], TTL)
        .await
        .unwrap();
    store
        .append_stream(&key, &token, 1, &all[1..4], TTL)
        .await
        .unwrap();
    store
        .append_stream(&key, &token, 0, &all[..1], TTL)
        .await
        .unwrap();
    assert_eq!(read_all(store, &key, 0).await, &all[..4]);
    match store.append_stream(&key, &token, 5, &all[5..], TTL).await {
        Err(StoreError::Backend(_)) => {}
        other => panic!("an append past the end (a gap): expected a backend error, got {other:?}"),
    }
    assert_eq!(
        read_all(store, &key, 0).await,
        &all[..4],
        "the gap added nothing"
    );
    store
        .append_stream(&key, &token, 4, &all[4..], TTL)
        .await
        .unwrap();
    assert_eq!(read_all(store, &key, 0).await, all);
    store.release(&key, &token).await.unwrap();
}

/// The owner whose lease lapsed, once another took the key over, can no longer append
/// (`LeaseLost`); its stream is not the new owner's (`NotLive` for readers) until the new
/// owner's chunk 0 replaces it, and none of the old chunks reads after that.
pub async fn stream_takeover_replaces_the_stream<St: Store>(store: &St) {
    let key = fresh_key("stream-takeover");
    let old = claim_owned(store, &key, SHORT).await;
    let stale: Vec<Bytes> = (0..3).map(|i| chunk(format!("stale-{i}"))).collect();
    store
        .append_stream(&key, &old, 0, &stale, TTL)
        .await
        .unwrap();
    tokio::time::sleep(SHORT * 2).await;
    let new = claim_owned(store, &key, LEASE).await;
    assert_not_live(
        store.read_stream(&key, 0).await,
        "a crashed owner's stream, for its successor",
    );
    assert_lease_lost(
        store
            .append_stream(&key, &old, 3, &[chunk("late")], TTL)
            .await,
        "an append by the owner whose lease lapsed",
    );
    assert_lease_lost(
        store
            .append_stream(&key, &old, 0, &[chunk("late")], TTL)
            .await,
        "a restart by the owner whose lease lapsed",
    );
    match store
        .append_stream(&key, &new, 1, &[chunk("fresh-1")], TTL)
        .await
    {
        Err(StoreError::Backend(_)) => {}
        other => panic!("the successor's append past its own (empty) stream: {other:?}"),
    }
    store
        .append_stream(&key, &new, 0, &[chunk("fresh-0")], TTL)
        .await
        .unwrap();
    assert_eq!(read_all(store, &key, 0).await, [chunk("fresh-0")]);
    store.release(&key, &new).await.unwrap();
}

/// A stream ends with its claim: once completed, a read answers the record (fingerprint and
/// payload whole); once released, `Absent`, and the next owner of the key finds no stream
/// (`NotLive`) until it appends its own. A lapsed owner's completion leaves the successor's
/// stream alone.
pub async fn stream_ends_with_its_claim<St: Store>(store: &St) {
    let key = fresh_key("stream-complete");
    let token = claim_owned(store, &key, LEASE).await;
    store
        .append_stream(&key, &token, 0, &[chunk("a"), chunk("b")], TTL)
        .await
        .unwrap();
    let record = Record::new(Some(u128::MAX - 3), "the outcome");
    store
        .complete(&key, &token, record.clone(), TTL)
        .await
        .unwrap();
    match store.read_stream(&key, 0).await {
        Ok(StreamRead::Completed(got)) => assert_eq!(got, record),
        other => panic!("a completed key: expected its record, got {other:?}"),
    }
    match store.read_stream(&key, 5).await {
        Ok(StreamRead::Completed(got)) => assert_eq!(got, record),
        other => panic!("a completed key, from past the end: {other:?}"),
    }
    assert_lease_lost(
        store
            .append_stream(&key, &token, 2, &[chunk("c")], TTL)
            .await,
        "an append after the completion",
    );

    let released = fresh_key("stream-release");
    let token = claim_owned(store, &released, LEASE).await;
    store
        .append_stream(&released, &token, 0, &[chunk("a")], TTL)
        .await
        .unwrap();
    store.release(&released, &token).await.unwrap();
    assert!(
        matches!(
            store.read_stream(&released, 0).await,
            Ok(StreamRead::Absent)
        ),
        "a released key reads Absent"
    );
    let next = claim_owned(store, &released, LEASE).await;
    assert_not_live(
        store.read_stream(&released, 0).await,
        "the next owner of a released key",
    );
    store
        .append_stream(&released, &next, 0, &[chunk("next")], TTL)
        .await
        .unwrap();
    assert_eq!(read_all(store, &released, 0).await, [chunk("next")]);
    store.release(&released, &next).await.unwrap();

    // A lapsed owner's late completion is refused and ends nothing of its successor's.
    let key = fresh_key("stream-late-complete");
    let old = claim_owned(store, &key, SHORT).await;
    store
        .append_stream(&key, &old, 0, &[chunk("old")], TTL)
        .await
        .unwrap();
    tokio::time::sleep(SHORT * 2).await;
    let new = claim_owned(store, &key, LEASE).await;
    store
        .append_stream(&key, &new, 0, &[chunk("new")], TTL)
        .await
        .unwrap();
    assert_lease_lost(
        store
            .complete(&key, &old, Record::new(None, "late"), TTL)
            .await,
        "a late completion",
    );
    assert_lease_lost(store.release(&key, &old).await, "a late release");
    assert_eq!(read_all(store, &key, 0).await, [chunk("new")]);
    store.release(&key, &new).await.unwrap();
}

/// A stream is kept no longer than its TTL after its last append: a reader then finds the key
/// in flight without a stream.
pub async fn stream_ends_after_its_ttl<St: Store>(store: &St) {
    let key = fresh_key("stream-ttl");
    let token = claim_owned(store, &key, LEASE).await;
    store
        .append_stream(&key, &token, 0, &[chunk("brief")], SHORT)
        .await
        .unwrap();
    tokio::time::sleep(SHORT * 2).await;
    assert_not_live(store.read_stream(&key, 0).await, "a stream past its TTL");
    store.release(&key, &token).await.unwrap();
}

/// One read answers at most about 1 MiB of chunks (at least one, however large), and the
/// reader gets the rest by reading on.
pub async fn stream_reads_are_capped<St: Store>(store: &St) {
    const MIB: usize = 1 << 20;
    let key = fresh_key("stream-cap");
    let token = claim_owned(store, &key, LEASE).await;
    let chunks: Vec<Bytes> = [MIB / 2 + 1, MIB / 2 + 1, 3 * MIB / 2, 10, 10]
        .iter()
        .enumerate()
        .map(|(i, len)| Bytes::from(vec![i as u8; *len]))
        .collect();
    store
        .append_stream(&key, &token, 0, &chunks, TTL)
        .await
        .unwrap();
    let first = live(store.read_stream(&key, 0).await, "the first read");
    assert_eq!(first, &chunks[..1], "two halves and a byte are over 1 MiB");
    let large = live(store.read_stream(&key, 2).await, "a chunk over 1 MiB");
    assert_eq!(large, &chunks[2..3], "a chunk over the cap comes alone");
    let small = live(store.read_stream(&key, 3).await, "small chunks");
    assert_eq!(small, &chunks[3..]);
    assert_eq!(read_all(store, &key, 0).await, chunks);
    store.release(&key, &token).await.unwrap();
}

/// 10 MB of chunks, appended in batches as a streaming response produces them, read back
/// whole and byte-identical.
pub async fn stream_of_10_mb_round_trips<St: Store>(store: &St) {
    let key = fresh_key("stream-10mb");
    let token = claim_owned(store, &key, LEASE).await;
    let chunks: Vec<Bytes> = (0..160u32)
        .map(|i| {
            (0..64 * 1000u32)
                .map(|j| (i.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8)
                .collect()
        })
        .collect();
    for (batch, part) in chunks.chunks(16).enumerate() {
        store
            .append_stream(&key, &token, (batch * 16) as u64, part, TTL)
            .await
            .unwrap();
    }
    let back = read_all(store, &key, 0).await;
    assert_eq!(back.len(), chunks.len());
    assert!(back == chunks, "10 MB of chunks came back changed");
    store.release(&key, &token).await.unwrap();
}

/// Keys shaped to collide ([`adversarial_keys`]: shared hash tags, braces, `|`, prefixes and
/// suffixes of each other) each read their own stream only, and the end of one key's claim
/// ends no other key's stream.
pub async fn stream_keys_share_nothing<St: Store>(store: &St) {
    let keys = adversarial_keys(&format!("{:032x}", fastrand::u128(..)));
    let mut tokens = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        let token = claim_owned(store, key, LEASE).await;
        store
            .append_stream(
                key,
                &token,
                0,
                &[chunk(format!("{i}")), chunk(key.clone())],
                TTL,
            )
            .await
            .unwrap();
        tokens.push(token);
    }
    for (i, key) in keys.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        store
            .complete(
                key,
                &tokens[i],
                Record::new(None, format!("record-{i}")),
                TTL,
            )
            .await
            .unwrap();
    }
    for (i, key) in keys.iter().enumerate() {
        match store.read_stream(key, 0).await {
            Ok(StreamRead::Completed(record)) if i % 2 == 0 => {
                assert_eq!(
                    record.payload(),
                    format!("record-{i}").as_bytes(),
                    "{key:?}"
                );
            }
            Ok(StreamRead::Live(chunks)) if i % 2 == 1 => {
                assert_eq!(
                    chunks,
                    [chunk(format!("{i}")), chunk(key.clone())],
                    "{key:?}"
                );
            }
            other => panic!("{key:?}: expected its own stream or record, got {other:?}"),
        }
    }
    for (i, key) in keys.iter().enumerate().filter(|(i, _)| i % 2 == 1) {
        store.release(key, &tokens[i]).await.unwrap();
    }
}

/// Runs every check against `store`.
pub async fn run_all<St: Store + Clone>(store: &St) {
    crate::store_conformance_tests!(@run store);
}

/// Generates one `#[tokio::test]` (multi-threaded) per conformance check, in a module named
/// `$name`, each on a store made by `$make` (an expression evaluating to a future of the store).
///
/// With `optional:`, `$make` evaluates to a future of `Option<Store>`, and `None` skips the
/// check (for a server that is not installed): say why where `$make` returns `None`.
///
/// ```ignore
/// tower_idempotency::store_conformance_tests!(my_store, async { MyStore::connect().await });
/// tower_idempotency::store_conformance_tests!(my_server, optional: async { MyStore::try_connect().await });
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
#[macro_export]
macro_rules! store_conformance_tests {
    ($name:ident, optional: $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::store_conformance_tests!(@list [@tests $make]);
        }
    };
    ($name:ident, $make:expr) => {
        $crate::store_conformance_tests!($name, optional: async { Some($make.await) });
    };
    (@run $store:expr) => {
        $crate::store_conformance_tests!(@list [@run $store]);
    };
    // The one list of checks.
    (@list [$($how:tt)*]) => {
        $crate::store_conformance_tests!(@each [$($how)*]
            claim_then_in_flight, complete_then_replay, release_then_reclaim, owner_checks,
            keys_are_independent, renew_extends_the_lease, lapsed_lease_is_taken_over_and_fenced,
            record_expires_after_ttl, concurrent_claims_have_one_winner,
            claim_now_answers_as_claim_as,
            wait_returns_when_the_claim_ends, inspect_and_delete,
            recovery_points_are_fenced_by_the_owner, recovery_points_survive_a_release,
            recovery_points_end_with_completion_and_ttl, recovery_points_hold_64_kib,
            adversarial_keys_share_nothing);
    };
    (@each [@run $store:expr] $($case:ident),*) => {
        $( $crate::store::conformance::$case($store).await; )*
    };
    (@each [@tests $make:expr] $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let Some(store) = $make.await else { return };
                $crate::store::conformance::$case(&store).await;
            }
        )*
    };
}
