//! Issue 44, lever 3: a fresh key sends the server only the commands it needs. Without a
//! waiting duplicate and without a recovery point, that is the claim's `SET` and the
//! completion's write (`SET … IFEQ`, or the completion script's `GET` and `SET`): no wake-up
//! `PUBLISH` and no point `PEXPIRE`/`DEL`. A duplicate that waits marks the claim, and is then
//! woken at once, on the same handle and on another; also when it starts waiting just as the
//! completion lands. Each test on servers of its own (Redis 7.0 without `IFEQ`, Valkey with),
//! so that no other test's commands are counted.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::redis_stats::{commands, reset_stats, writes};
use support::servers::{raw_redis, RedisServer};
use tokio::sync::Barrier;
use tower_idempotency::store::{ClaimOutcome, Record, RecoveryPoint, RedisStore, Store};

const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(600);

/// A Redis 7.0 (no `SET … IFEQ`: the completion script) and a Valkey (`IFEQ`), each this
/// test's own; whichever is installed.
fn servers() -> Vec<(&'static str, RedisServer)> {
    let mut servers = Vec::new();
    if let Some(redis) = support::servers::own_redis("count the commands of") {
        servers.push(("redis", redis));
    }
    if let Some(valkey) = support::servers::own_valkey() {
        servers.push(("valkey", valkey));
    }
    servers
}

async fn claimed(store: &RedisStore, key: &str) -> tower_idempotency::store::OwnerToken {
    match store.claim(key, LEASE).await.unwrap() {
        ClaimOutcome::Claimed(token) => token,
        other => panic!("{key} is fresh: {other:?}"),
    }
}

/// Claims the fresh `key` and completes it. The first completion of a store on Redis 7.0 also
/// learns that `IFEQ` is refused, and loads the script: a warm-up before counting.
async fn completed(store: &RedisStore, key: &str) {
    let token = claimed(store, key).await;
    store
        .complete(key, &token, Record::new(Some(1), "done"), TTL)
        .await
        .unwrap();
}

/// A fresh key with no waiter and no point: the claim's write and the completion's write, one
/// round trip each, and nothing else written (no `PUBLISH`, no `PEXPIRE`): on Valkey the
/// claim's round trip also reads whether the key has a point (`EXISTS`); on Redis 7.0 the
/// completion script's `DEL` of the point finds none and writes nothing.
#[tokio::test]
async fn a_fresh_key_without_waiters_or_points_sends_only_its_two_writes() {
    for (name, server) in servers() {
        let url = server.url();
        let store = RedisStore::connect(&url).await.unwrap();
        completed(&store, "warm").await;
        reset_stats(&url).await;
        for n in 0..5 {
            completed(&store, &format!("fresh-{n}")).await;
        }
        let per_key = |n: u64| n as f64 / 5.0;
        let ran = commands(&url).await;
        let expected: &[(&str, u64)] = if name == "valkey" {
            &[("exists", 5), ("set", 10)]
        } else {
            // The claim's `SET`, then the script: `EVALSHA`, its `GET` (the owner check),
            // `SET`, and `DEL` of the point (there is none: nothing deleted, nothing written).
            &[("del", 5), ("evalsha", 5), ("get", 5), ("set", 10)]
        };
        let expected: std::collections::BTreeMap<String, u64> = expected
            .iter()
            .map(|(c, n)| ((*c).to_owned(), *n))
            .collect();
        assert_eq!(
            ran,
            expected,
            "{name}: commands for 5 fresh keys ({} per key)",
            per_key(ran.values().sum())
        );
        assert_eq!(writes(&url).await, 10, "{name}: writes for 5 fresh keys");
    }
}

/// A key with a recovery point: its completion ends the point (`DEL` in the completion script,
/// which a claim that knows a point uses on every server), so the point's write goes only
/// with keys that have one.
#[tokio::test]
async fn a_key_with_a_point_ends_it_and_only_it_pays_for_that() {
    for (name, server) in servers() {
        let url = server.url();
        let store = RedisStore::connect(&url).await.unwrap();
        completed(&store, "warm").await;
        let with_point = claimed(&store, "with-point").await;
        store
            .save_point(
                "with-point",
                &with_point,
                &RecoveryPoint::new("charged", "ch_1"),
                TTL,
            )
            .await
            .unwrap();
        let without = claimed(&store, "without").await;
        reset_stats(&url).await;
        store
            .complete("without", &without, Record::new(None, "a"), TTL)
            .await
            .unwrap();
        assert_eq!(writes(&url).await, 1, "{name}: the record alone");
        store
            .complete("with-point", &with_point, Record::new(None, "b"), TTL)
            .await
            .unwrap();
        assert_eq!(
            writes(&url).await,
            3,
            "{name}: the record and the point's end"
        );
        // The next run of the key, once the record is gone, finds no point.
        let () = redis::cmd("DEL")
            .arg("idempotency:with-point")
            .query_async(&mut raw_redis(&url).await)
            .await
            .unwrap();
        let next = claimed(&store, "with-point").await;
        let point = store.load_point("with-point", &next).await.unwrap();
        assert!(
            point.is_none(),
            "{name}: the script deletes the point: {point:?}"
        );
    }
}

/// The value the server holds for `key` (the claim, marked or not, or the record).
async fn value(url: &str, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET")
        .arg(format!("idempotency:{key}"))
        .query_async(&mut raw_redis(url).await)
        .await
        .unwrap()
}

/// Starts `store`'s subscriber and gives it time to subscribe (the store does not say when it
/// listens; as the shared stores' wake-up case does).
async fn listening(store: &RedisStore) {
    let _ = tokio::time::timeout(Duration::from_millis(300), store.wait("nobody", 0)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Duplicates waiting on the same handle and on another are woken by the completion at once
/// (not by their 2 s bound), and the completion publishes because they wait; a release too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_on_the_same_and_another_handle_are_woken_at_once() {
    for (name, server) in servers() {
        let url = server.url();
        let (a, b) = (
            RedisStore::connect(&url).await.unwrap(),
            RedisStore::connect(&url).await.unwrap(),
        );
        listening(&a).await;
        listening(&b).await;
        for round in 0..4 {
            let key = format!("waited-{round}");
            let token = claimed(&a, &key).await;
            let claim = value(&url, &key).await.unwrap();
            reset_stats(&url).await;
            let waiters: Vec<_> = [a.clone(), b.clone()]
                .into_iter()
                .map(|store| {
                    let key = key.clone();
                    tokio::spawn(async move {
                        store.wait(&key, 6).await;
                        Instant::now()
                    })
                })
                .collect();
            // The waiters marked the claim: its value is no longer the claim the owner wrote.
            let start = Instant::now();
            while value(&url, &key).await.as_ref() == Some(&claim) {
                assert!(
                    start.elapsed() < Duration::from_secs(1),
                    "{name}: no waiter marked the claim"
                );
                tokio::task::yield_now().await;
            }
            let ended = Instant::now();
            if round % 2 == 0 {
                a.complete(&key, &token, Record::new(None, "done"), TTL)
                    .await
                    .unwrap();
            } else {
                a.release(&key, &token).await.unwrap();
            }
            for waiter in waiters {
                let lag = waiter.await.unwrap().saturating_duration_since(ended);
                assert!(
                    lag < Duration::from_millis(500),
                    "{name} round {round}: woken {lag:?} after the claim ended"
                );
            }
            assert_eq!(
                commands(&url).await.get("publish"),
                Some(&1),
                "{name}: one wake-up"
            );
        }
    }
}

/// The race: many duplicates start waiting at the instant their keys complete. Each one that
/// marks its claim before the completion is woken by it, and each that comes after finds the
/// record: none waits out its bound (2 s), and every one ends with the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_that_starts_waiting_as_the_completion_lands_is_not_left_waiting() {
    const KEYS: usize = 64;
    for (name, server) in servers() {
        let url = server.url();
        let (a, b) = (
            RedisStore::connect(&url).await.unwrap(),
            RedisStore::connect(&url).await.unwrap(),
        );
        listening(&b).await;
        for round in 0..3 {
            let keys: Vec<String> = (0..KEYS).map(|n| format!("race-{round}-{n}")).collect();
            let mut tokens = Vec::new();
            for key in &keys {
                tokens.push(claimed(&a, key).await);
            }
            let barrier = Arc::new(Barrier::new(2 * KEYS));
            let mut tasks = Vec::new();
            for (key, token) in keys.iter().cloned().zip(tokens) {
                let (a, b) = (a.clone(), b.clone());
                let (to_complete, to_wait) = (barrier.clone(), barrier.clone());
                let completing = key.clone();
                tokio::spawn(async move {
                    to_complete.wait().await;
                    a.complete(&completing, &token, Record::new(None, "done"), TTL)
                        .await
                        .unwrap();
                });
                tasks.push(tokio::spawn(async move {
                    to_wait.wait().await;
                    let start = Instant::now();
                    for attempt in 0.. {
                        match b.claim(&key, LEASE).await.unwrap() {
                            ClaimOutcome::Completed(record) => {
                                assert_eq!(record.payload(), "done");
                                return start.elapsed();
                            }
                            ClaimOutcome::InFlight { .. } => b.wait(&key, attempt).await,
                            ClaimOutcome::Claimed(_) => panic!("{key}: claimed while held"),
                        }
                    }
                    unreachable!()
                }));
            }
            let mut slowest = Duration::ZERO;
            for task in tasks {
                slowest = slowest.max(task.await.unwrap());
            }
            assert!(
                slowest < Duration::from_millis(1500),
                "{name} round {round}: a duplicate waited {slowest:?} (its bound, not a wake-up)"
            );
        }
    }
}

/// A claim written by an earlier release (format 1, whose owner publishes every completion and
/// compares its claim byte for byte) is never marked by a waiter: a rolling upgrade keeps the
/// earlier owners' completions working.
#[tokio::test]
async fn a_waiter_leaves_an_earlier_releases_claim_as_it_is() {
    for (name, server) in servers() {
        let url = server.url();
        let store = RedisStore::connect(&url).await.unwrap();
        listening(&store).await;
        let mut earlier = b"C\x01".to_vec();
        earlier.extend_from_slice(&7u128.to_be_bytes());
        let () = redis::cmd("SET")
            .arg("idempotency:earlier")
            .arg(&earlier)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut raw_redis(&url).await)
            .await
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(200), store.wait("earlier", 6)).await;
        assert_eq!(value(&url, "earlier").await, Some(earlier), "{name}");
    }
}

/// A crashed or failed run's point, loaded by the retry on another instance: the retry's
/// completion ends it (the point is known to the claim that loaded it), so the next run of the
/// key, once the record is gone, starts afresh.
#[tokio::test]
async fn a_retry_on_another_instance_that_loads_the_point_ends_it() {
    for (name, server) in servers() {
        let url = server.url();
        let (a, b) = (
            RedisStore::connect(&url).await.unwrap(),
            RedisStore::connect(&url).await.unwrap(),
        );
        let key = "inherited";
        let first = claimed(&a, key).await;
        let point = RecoveryPoint::new("charged", "ch_1");
        a.save_point(key, &first, &point, TTL).await.unwrap();
        a.release(key, &first).await.unwrap();
        let retry = claimed(&b, key).await;
        assert_eq!(b.load_point(key, &retry).await.unwrap(), Some(point));
        b.complete(
            key,
            &retry,
            Record::new(None, "done"),
            Duration::from_millis(200),
        )
        .await
        .unwrap();
        // Past the record's TTL, the next run finds no point.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let next = claimed(&a, key).await;
        assert_eq!(a.load_point(key, &next).await.unwrap(), None, "{name}");
    }
}

/// A replay (the key holds its record) is the claim's one round trip: on Redis 7.0 its `SET …
/// NX GET` alone, which answers the record (nothing asks whether the key has a point: its
/// completion script ends any); on Valkey that `SET` and the `EXISTS` of the point that a
/// fresh key's plain `SET … IFEQ` completion needs. The path a retry storm takes.
#[tokio::test]
async fn a_replay_is_one_round_trip_and_on_redis_one_command() {
    for (name, server) in servers() {
        let url = server.url();
        let store = RedisStore::connect(&url).await.unwrap();
        completed(&store, "warm").await;
        completed(&store, "stored").await;
        reset_stats(&url).await;
        for _ in 0..5 {
            match store.claim("stored", LEASE).await.unwrap() {
                ClaimOutcome::Completed(record) => assert_eq!(record.payload(), "done"),
                other => panic!("{name}: a stored key replays: {other:?}"),
            }
        }
        let expected: &[(&str, u64)] = if name == "valkey" {
            &[("exists", 5), ("set", 5)]
        } else {
            &[("set", 5)]
        };
        let expected: std::collections::BTreeMap<String, u64> = expected
            .iter()
            .map(|(c, n)| ((*c).to_owned(), *n))
            .collect();
        assert_eq!(
            commands(&url).await,
            expected,
            "{name}: commands for 5 replays"
        );
    }
}
