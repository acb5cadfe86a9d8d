//! `SqliteStore` on real files: the conformance suite, several handles (connections) on one
//! file as several processes hold, restarts, and the errors of a bad path.

use crate::support;

use std::time::Duration;

use support::servers::{shared_temp_dir, TempDir};
use support::shared_store;
use tower_idempotency::store::{ClaimOutcome, Record, SqliteStore, Store, StoreError};

/// A handle on the file the tests of this process share (each call: a new connection, as
/// another process would open).
async fn store() -> Option<SqliteStore> {
    Some(
        SqliteStore::open(shared_temp_dir().join("shared.db"))
            .await
            .expect("open the shared database"),
    )
}

tower_idempotency::store_conformance_tests!(conformance, optional: store());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_connections_racing_for_one_key_have_one_winner() {
    let (Some(a), Some(b)) = (store().await, store().await) else {
        return;
    };
    shared_store::two_handles_race_for_one_key(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lapsed_lease_is_taken_over_by_another_connection_and_fenced() {
    let (Some(a), Some(b)) = (store().await, store().await) else {
        return;
    };
    shared_store::lapsed_lease_is_taken_over_by_another_instance(&a, &b).await;
}

#[tokio::test]
async fn a_very_long_scope_works() {
    let Some(store) = store().await else { return };
    shared_store::a_very_long_scope_works(store).await;
}

#[tokio::test]
async fn records_survive_closing_and_reopening_the_file() {
    let Some(first) = store().await else { return };
    shared_store::records_survive_a_reconnect(first, async { store().await.unwrap() }).await;
}

/// A waiter on the same handle is woken at once when the claim ends (not after a backoff).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_the_same_handle_is_woken_at_once() {
    let Some(store) = store().await else { return };
    for round in 0..5 {
        let key = tower_idempotency::store::conformance::fresh_key(&format!("wake-{round}"));
        let ClaimOutcome::Claimed(token) =
            store.claim(&key, Duration::from_secs(30)).await.unwrap()
        else {
            panic!()
        };
        let waiter = tokio::spawn({
            let (store, key) = (store.clone(), key.clone());
            // Attempt 6: a backoff of up to 500 ms.
            async move {
                store.wait(&key, 6).await;
                std::time::Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ended = std::time::Instant::now();
        store.release(&key, &token).await.unwrap();
        let lag = waiter.await.unwrap().saturating_duration_since(ended);
        assert!(lag < Duration::from_millis(100), "round {round}: {lag:?}");
    }
}

/// Replays are served from the in-process cache without reading the file: a record deleted
/// behind the store's back (by another connection) is still replayed by a store with the
/// cache, and not by one without it. A claim needs the file: while another connection holds
/// the write lock past the busy timeout, it fails as a store error (503 through the layer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_come_from_the_cache_and_claims_from_the_file() {
    let dir = TempDir::new("sqlite-cache");
    let path = dir.path().join("cache.db");
    let open = |cache: u64| {
        SqliteStore::builder(&path)
            .busy_timeout(Duration::from_millis(200))
            .replay_cache_bytes(cache)
            .open()
    };
    let (cached, uncached) = (open(1 << 20).await.unwrap(), open(0).await.unwrap());
    for store in [&cached, &uncached] {
        let ClaimOutcome::Claimed(token) = store.claim("k", Duration::from_secs(30)).await.unwrap()
        else {
            panic!()
        };
        store
            .complete(
                "k",
                &token,
                Record::new(Some(1), "kept"),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        let other = rusqlite::Connection::open(&path).unwrap();
        other.busy_timeout(Duration::from_secs(5)).unwrap();
        other
            .execute("DELETE FROM idempotency_records WHERE key = 'k'", [])
            .unwrap();
        let again = store.claim("k", Duration::from_secs(30)).await.unwrap();
        if std::ptr::eq(store, &cached) {
            assert!(
                matches!(again, ClaimOutcome::Completed(ref r) if r.payload() == "kept"),
                "{again:?}"
            );
        } else {
            assert!(matches!(again, ClaimOutcome::Claimed(_)), "{again:?}");
        }
    }
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE;").unwrap();
    let fresh = cached.claim("fresh", Duration::from_secs(30)).await;
    assert!(
        matches!(fresh, Err(StoreError::Backend(_))),
        "a claim needs the file: {fresh:?}"
    );
    drop(blocker);
    assert!(matches!(
        cached
            .claim("fresh", Duration::from_secs(30))
            .await
            .unwrap(),
        ClaimOutcome::Claimed(_)
    ));
}

/// Expired rows are ignored, then deleted by `purge_expired`.
#[tokio::test]
async fn expired_rows_are_purged() {
    let dir = TempDir::new("sqlite-purge");
    let store = SqliteStore::builder(dir.path().join("purge.db"))
        .purge_every(None)
        .replay_cache_bytes(0)
        .open()
        .await
        .unwrap();
    for key in ["a", "b", "c"] {
        let ClaimOutcome::Claimed(token) = store.claim(key, Duration::from_secs(30)).await.unwrap()
        else {
            panic!()
        };
        store
            .complete(
                key,
                &token,
                Record::new(None, "x"),
                Duration::from_millis(50),
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.purge_expired(2).await.unwrap(), 2);
    assert_eq!(store.purge_expired(2).await.unwrap(), 1);
    assert_eq!(store.purge_expired(2).await.unwrap(), 0);
}

fn open_error(result: Result<SqliteStore, StoreError>) -> String {
    let Err(StoreError::Backend(error)) = result else {
        panic!("expected an error at open, got {result:?}");
    };
    error.to_string()
}

#[tokio::test]
async fn a_path_that_cannot_be_opened_fails_at_open_with_a_clear_message() {
    let dir = TempDir::new("sqlite-errors");
    let missing = dir.path().join("no-such-directory").join("db.sqlite");
    let message = open_error(SqliteStore::open(&missing).await);
    assert!(
        message.starts_with("cannot open the SQLite database")
            && message.contains("no-such-directory"),
        "{message}"
    );
}

#[tokio::test]
async fn a_file_that_is_not_a_database_fails_at_open_with_a_clear_message() {
    let dir = TempDir::new("sqlite-errors");
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "these are not the pages of a database ".repeat(200)).unwrap();
    let message = open_error(SqliteStore::open(&path).await);
    assert!(message.ends_with("is not a SQLite database (point the store at a new file or an existing idempotency database)"), "{message}");
    assert!(message.contains("notes.txt"), "{message}");
}

#[tokio::test]
async fn a_database_of_a_newer_schema_is_refused_at_open() {
    let dir = TempDir::new("sqlite-errors");
    let path = dir.path().join("future.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("PRAGMA user_version = 99;")
        .unwrap();
    let message = open_error(SqliteStore::open(&path).await);
    assert!(
        message.contains("has schema version 99, newer than this build"),
        "{message}"
    );
}

#[tokio::test]
async fn a_read_only_database_is_refused_at_open() {
    if unsafe_is_root() {
        support::servers::skip(
            "running as root: file permissions do not stop root; the read-only case is not checked",
        );
        return;
    }
    let dir = TempDir::new("sqlite-errors");
    let path = dir.path().join("ro.db");
    drop(SqliteStore::open(&path).await.unwrap());
    let mut permissions = std::fs::metadata(&path).unwrap().permissions();
    permissions.set_readonly(true);
    std::fs::set_permissions(&path, permissions).unwrap();
    let message = open_error(SqliteStore::open(&path).await);
    assert!(message.contains("read-only"), "{message}");
}

fn unsafe_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0"))
}
