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

/// A store on its own file in `dir`, purging every `purge_every`.
async fn own_store(dir: &TempDir, purge_every: Option<Duration>) -> SqliteStore {
    SqliteStore::builder(dir.path().join("own.db"))
        .purge_every(purge_every)
        .open()
        .await
        .unwrap()
}

/// How long a store may go without looking at its file before a claim looks again.
const IDLE_SPELL: Duration = Duration::from_millis(1100);

/// A payment stored through the layer; then `change` is done to the file under the running
/// store; after `wait`, a fresh key and the stored one both answer 503 (the store fails
/// closed: the handler is not run, nothing is replayed), and keep doing so.
async fn fails_closed_after<Fut: std::future::Future<Output = ()>>(
    store: SqliteStore,
    change: impl FnOnce(std::path::PathBuf) -> Fut,
    wait: Duration,
) {
    use support::{app, request, send};
    let (mut app, probe) = app(tower_idempotency::IdempotencyLayer::with_store(
        store.clone(),
    ));
    let stored = tower_idempotency::store::conformance::fresh_key("file-stored");
    assert_eq!(
        send(&mut app, request(Some(&stored), "{}", &[]))
            .await
            .status,
        201
    );
    change(store.path().to_owned()).await;
    tokio::time::sleep(wait).await;
    for round in 0..3 {
        let fresh = tower_idempotency::store::conformance::fresh_key("file-fresh");
        for key in [&fresh, &stored] {
            let answer = send(&mut app, request(Some(key), "{}", &[])).await;
            assert_eq!(answer.status, 503, "round {round}: {:?}", answer.body);
            assert!(!answer.replayed());
        }
    }
    assert_eq!(
        probe.executions(),
        1,
        "the handler ran on a file that is not the store's"
    );
    match store.claim("direct", Duration::from_secs(5)).await {
        Err(StoreError::Backend(error)) => {
            let said = error.to_string();
            assert!(said.contains("no longer"), "{said}");
        }
        other => panic!("expected a store error, got {other:?}"),
    }
}

async fn deleted(path: std::path::PathBuf) {
    delete_database(&path);
}

fn delete_database(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}

/// Another database moved over the path (a restore of a backup, a copy): the path names
/// another file than the store's.
async fn replaced(path: std::path::PathBuf) {
    let other = path.with_extension("other");
    let db = rusqlite::Connection::open(&other).unwrap();
    db.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(db);
    delete_database(&path);
    std::fs::rename(&other, &path).unwrap();
}

/// The file deleted, then a second process opens the path: it creates a new, empty database
/// there (and would run every key again).
async fn recreated_by_another_process(path: std::path::PathBuf) {
    delete_database(&path);
    let second = SqliteStore::open(&path).await.unwrap();
    assert!(matches!(
        second
            .claim("another process", Duration::from_secs(5))
            .await,
        Ok(ClaimOutcome::Claimed(_))
    ));
}

#[tokio::test]
async fn a_database_file_deleted_under_the_store_fails_claims_after_an_idle_spell() {
    let dir = TempDir::new("sqlite-deleted");
    let store = own_store(&dir, None).await;
    fails_closed_after(store, deleted, IDLE_SPELL).await;
}

#[tokio::test]
async fn a_database_file_replaced_under_the_store_fails_claims_after_an_idle_spell() {
    let dir = TempDir::new("sqlite-replaced");
    let store = own_store(&dir, None).await;
    fails_closed_after(store, replaced, IDLE_SPELL).await;
}

#[tokio::test]
async fn a_database_recreated_at_the_path_by_another_process_fails_claims_after_an_idle_spell() {
    let dir = TempDir::new("sqlite-recreated");
    let store = own_store(&dir, None).await;
    fails_closed_after(store, recreated_by_another_process, IDLE_SPELL).await;
}

/// The purge loop looks too: a store kept busy (no idle spell) notices within a purge period.
#[tokio::test]
async fn the_purge_loop_notices_a_deleted_database_file() {
    let dir = TempDir::new("sqlite-deleted-purge");
    let store = own_store(&dir, Some(Duration::from_millis(50))).await;
    fails_closed_after(store, deleted, Duration::from_millis(300)).await;
}

/// The store error of a call on a full disk says so.
fn says_disk_full<T: std::fmt::Debug>(what: &str, result: Result<T, StoreError>) {
    match result {
        Err(StoreError::Backend(error)) => {
            let said = error.to_string();
            assert!(
                said.contains("disk") && said.contains("full"),
                "{what}: {said}"
            );
        }
        other => panic!("{what}: expected a store error, got {other:?}"),
    }
}

/// On a full disk a claim, a completion and a recovery point's save each fail with a store
/// error that says the disk is full (a claim is a 503 over HTTP, the handler not run); the
/// records already stored keep replaying, the file stays sound, and once space is freed
/// every call works again, the refused completion included (its claim was kept).
#[tokio::test]
async fn a_full_disk_refuses_writes_with_a_clear_error_and_keeps_every_record() {
    use support::servers::SmallDisk;
    use support::{app, request, send};
    use tower_idempotency::store::RecoveryPoint;
    let Some(disk) = SmallDisk::mount("2m") else {
        return;
    };
    let path = disk.path().join("full.db");
    // No replay cache: replays read the file.
    let store = SqliteStore::builder(&path)
        .replay_cache_bytes(0)
        .purge_every(None)
        .open()
        .await
        .unwrap();
    let lease = Duration::from_secs(60);
    let ttl = Duration::from_secs(3600);
    let (mut app, probe) = app(tower_idempotency::IdempotencyLayer::with_store(
        store.clone(),
    ));
    let paid = tower_idempotency::store::conformance::fresh_key("full-paid");
    let first = send(&mut app, request(Some(&paid), "{}", &[])).await;
    assert_eq!(first.status, 201);
    let held = tower_idempotency::store::conformance::fresh_key;
    let (to_complete, to_save) = (held("full-complete"), held("full-save"));
    let mut tokens = Vec::new();
    for key in [&to_complete, &to_save] {
        let ClaimOutcome::Claimed(token) = store.claim(key, lease).await.unwrap() else {
            panic!("a fresh key is claimed");
        };
        tokens.push(token);
    }

    let filler = disk.fill();
    // What the WAL's last page still holds may take a write; after that, the disk is full for
    // every write. A claim answered `Claimed` must have been written: a second claim of its key
    // finds it in flight (a claim that was not would let two requests run one key).
    let mut refused = false;
    for attempt in 0..64 {
        let key = held(&format!("full-fill-{attempt}"));
        match store.claim(&key, lease).await {
            Ok(ClaimOutcome::Claimed(_)) => assert!(
                matches!(
                    store.claim(&key, lease).await,
                    Ok(ClaimOutcome::InFlight { .. })
                ),
                "a claim on a full disk answered Claimed but was not stored"
            ),
            other => {
                says_disk_full("a claim", other);
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "no claim was refused on a full disk");
    let refused_key = held("full-claim");
    says_disk_full("a claim", store.claim(&refused_key, lease).await);
    let record = Record::new(Some(7), "TI\x03not replayed, only stored");
    says_disk_full(
        "a completion",
        store
            .complete(&to_complete, &tokens[0], record.clone(), ttl)
            .await,
    );
    let point = RecoveryPoint::new("charged", "ch_1");
    says_disk_full(
        "a recovery point's save",
        store.save_point(&to_save, &tokens[1], &point, ttl).await,
    );
    // Over HTTP: a fresh key is a 503, the handler not run; the stored payment replays.
    let fresh = send(&mut app, request(Some(&held("full-http")), "{}", &[])).await;
    assert_eq!(fresh.status, 503, "{:?}", fresh.body);
    let replay = send(&mut app, request(Some(&paid), "{}", &[])).await;
    assert!(replay.replayed());
    assert_eq!(replay.status, 201);
    assert_eq!(replay.body, first.body);
    assert_eq!(probe.executions(), 1);

    std::fs::remove_file(filler).unwrap();
    // The refused claim left nothing behind: the key is free.
    assert!(matches!(
        store.claim(&refused_key, lease).await,
        Ok(ClaimOutcome::Claimed(_))
    ));
    store
        .complete(&to_complete, &tokens[0], record.clone(), ttl)
        .await
        .expect("the completion, retried once space is freed");
    store
        .save_point(&to_save, &tokens[1], &point, ttl)
        .await
        .expect("the save, retried once space is freed");
    assert_eq!(
        store.load_point(&to_save, &tokens[1]).await.unwrap(),
        Some(point)
    );
    match store.claim(&to_complete, lease).await.unwrap() {
        ClaimOutcome::Completed(stored) => assert_eq!(stored, record),
        other => panic!("expected the completed record, got {other:?}"),
    }
    let replay = send(&mut app, request(Some(&paid), "{}", &[])).await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.body, first.body);
    let check: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

/// Every promise of live streams (`conformance::streams`): the SQLite store keeps them, for
/// duplicates in other processes on the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams() {
    use tower_idempotency::store::conformance::{streams, StreamSupport};
    let Some(store) = store().await else { return };
    assert_eq!(streams(&store).await, StreamSupport::Checked);
}
