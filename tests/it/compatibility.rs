//! Records written by earlier releases replay forever, and a table created by the first
//! release's schema is upgraded by `migrate()`: golden bytes on real servers, through the layer.

use crate::support;

use http::Method;
use support::servers::{own_postgres, postgres_url, raw_redis, redis_url};
use support::{app, request, send};
use tower_idempotency::store::{PostgresStore, RedisStore};
use tower_idempotency::{admin, IdempotencyLayer};

/// Stored responses as each release wrote them (`201`, `content-type: application/json`, a
/// carried `x-request-id`, the body `{"id":1}`): format 1 (before trailers), format 2 (with a
/// trailer), format 3 (length and checksum), format 4 (a chunk table: the body in two chunks):
/// the golden records of `src/http/record.rs`.
const GOLDEN_RECORDS: &[(&str, &[u8])] = &[
    ("format 1", b"TI\x01\x00\x00\xc9\x00\x01\x00\x0ccontent-type\x00\x00\x00\x10application/json\x00\x01\x00\x0cx-request-id\x00\x00\x00\x03r-1{\"id\":1}"),
    ("format 2", b"TI\x02\x02\x00\xc9\x00\x01\x00\x0ccontent-type\x00\x00\x00\x10application/json\x00\x01\x00\x0cx-request-id\x00\x00\x00\x03r-1\x00\x01\x00\x0bgrpc-status\x00\x00\x00\x010{\"id\":1}"),
    ("format 3", b"TI\x03\x00\x00\x00\x46\x6e\x88\x1f\xfa\xc0\x8c\xab\x84\x00\x00\xc9\x00\x01\x00\x0ccontent-type\x00\x00\x00\x10application/json\x00\x01\x00\x0cx-request-id\x00\x00\x00\x03r-1{\"id\":1}"),
    ("format 4", b"TI\x04\x00\x00\x00R\xc7\x0b\xfb\xbdr\x9e\xa3\xbe\x00\x00\xc9\x00\x01\x00\x0ccontent-type\x00\x00\x00\x10application/json\x00\x01\x00\x0cx-request-id\x00\x00\x00\x03r-1\x00\x00\x00\x02\x00\x00\x00\x06\x00\x00\x00\x02{\"id\":1}"),
];

async fn assert_replays<St: tower_idempotency::store::Store + Clone>(
    store: St,
    key: &str,
    what: &str,
) {
    let (mut app, probe) = app(IdempotencyLayer::with_store(store));
    let replay = send(&mut app, request(Some(key), "{}", &[])).await;
    assert!(
        replay.replayed(),
        "{what}: {:?} {:?}",
        replay.status,
        replay.body
    );
    assert_eq!(replay.status, 201, "{what}");
    assert_eq!(replay.headers["content-type"], "application/json", "{what}");
    assert_eq!(replay.body, "{\"id\":1}", "{what}");
    assert_eq!(probe.executions(), 0, "{what}");
}

fn store_key(key: &str) -> String {
    admin::http_key("", &Method::POST, "/payments", key)
}

/// The Redis value `'R' version=1 fingerprint-flag=0 record`, as every release so far wrote
/// it for a request without a fingerprint.
#[tokio::test]
async fn redis_records_of_every_format_replay() {
    let Some(url) = redis_url() else { return };
    let store = RedisStore::connect(&url).await.unwrap();
    let mut redis = raw_redis(&url).await;
    for (what, record) in GOLDEN_RECORDS {
        let key = tower_idempotency::store::conformance::fresh_key("golden");
        let mut value = b"R\x01\x00".to_vec();
        value.extend_from_slice(record);
        let () = redis::cmd("SET")
            .arg(format!("idempotency:{}", store_key(&key)))
            .arg(value)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_replays(store.clone(), &key, what).await;
    }
}

/// The table as release 0.1.0 created it (`schema_sql` then), with a row it wrote: `migrate()`
/// upgrades it in place (the recovery points' table), the row replays, and new keys
/// work, recovery points included.
#[tokio::test]
async fn a_table_of_the_first_release_is_migrated_and_its_rows_replay() {
    let Some(url) = postgres_url() else { return };
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let table = format!("v010_{:x}", fastrand_u32());
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (
                key         text        PRIMARY KEY,
                owner       bytea,
                completed   boolean     NOT NULL DEFAULT false,
                fingerprint bytea,
                payload     bytea,
                expires_at  timestamptz NOT NULL,
                created_at  timestamptz NOT NULL DEFAULT now()
            );
            CREATE INDEX {table}_expires_at ON {table} (expires_at);"
        ))
        .await
        .unwrap();
    let mut keys = Vec::new();
    for (what, record) in GOLDEN_RECORDS {
        let key = tower_idempotency::store::conformance::fresh_key("golden-pg");
        client
            .execute(
                &format!(
                    "INSERT INTO {table} (key, owner, completed, fingerprint, payload, expires_at) \
                     VALUES ($1, NULL, true, NULL, $2, now() + interval '1 hour')"
                ),
                &[&store_key(&key), &record.to_vec()],
            )
            .await
            .unwrap();
        keys.push((*what, key));
    }
    let store = PostgresStore::connect(&url)
        .await
        .unwrap()
        .with_table(&table)
        .unwrap();
    store.migrate().await.unwrap();
    for (what, key) in keys {
        assert_replays(store.clone(), &key, what).await;
    }
    // New work on the migrated table, recovery points included.
    use tower_idempotency::store::{conformance, Store};
    conformance::recovery_points_survive_a_release(&store).await;
    conformance::recovery_points_end_with_completion_and_ttl(&store).await;
    let _ = Store::inspect(&store, "x").await.unwrap();
}

/// `check_replication` reads a server without standbys as such, and one whose commits would
/// wait for a standby as such.
#[tokio::test]
async fn postgres_replication_settings_are_read() {
    let Some(server) = own_postgres("reconfigure") else {
        return;
    };
    let store = PostgresStore::connect(&server.url()).await.unwrap();
    let plain = store.check_replication().await.unwrap();
    assert_eq!(plain.standbys, 0);
    assert!(!plain.commits_wait_for_a_standby(), "{plain:?}");
    let (client, connection) = tokio_postgres::connect(&server.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    // One statement each: ALTER SYSTEM refuses to run in the implicit transaction of a
    // multi-statement query.
    for statement in [
        "ALTER SYSTEM SET synchronous_standby_names = 'standby1'",
        "SELECT pg_reload_conf()",
    ] {
        client.batch_execute(statement).await.unwrap();
    }
    // The reload reaches new sessions at once; a fresh store reads it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let fresh = PostgresStore::connect(&server.url()).await.unwrap();
        let read = fresh.check_replication().await.unwrap();
        if read.commits_wait_for_a_standby() {
            assert_eq!(read.synchronous_standby_names, "standby1");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{read:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The golden record of format 3 as the release before checksummed rows stored it in a SQL
/// row: the payload column the bare stored response, the fingerprint in its own column
/// (`None`: NULL, a request without a fingerprint).
fn old_row(fingerprint: Option<Vec<u8>>) -> (Option<Vec<u8>>, Vec<u8>) {
    (fingerprint, GOLDEN_RECORDS[2].1.to_vec())
}

/// A row of the old layout with a fingerprint replays to its own payload and answers another
/// payload 422; one with a NULL fingerprint (written without fingerprints) replays to any.
async fn old_rows_replay<St: tower_idempotency::store::Store + Clone>(
    store: St,
    with_fingerprint: &str,
    without: &str,
) {
    assert_replays(
        store.clone(),
        with_fingerprint,
        "an old row with a fingerprint",
    )
    .await;
    let (mut app, probe) = app(IdempotencyLayer::with_store(store.clone()));
    let other = send(&mut app, request(Some(with_fingerprint), "{\"x\":1}", &[])).await;
    other.assert_problem(422, "key-reused");
    assert_eq!(probe.executions(), 0);
    assert_replays(store, without, "an old row without a fingerprint").await;
}

/// The fingerprint the layer stores for a request with the body `{}`, read from the row the
/// layer wrote for it (`column`: how to read it).
async fn fingerprint_of_empty_object<St, F, Fut>(store: St, column: F) -> Vec<u8>
where
    St: tower_idempotency::store::Store + Clone,
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Vec<u8>>,
{
    let (mut app, _) = app(IdempotencyLayer::with_store(store));
    let key = tower_idempotency::store::conformance::fresh_key("fingerprint");
    assert_eq!(
        send(&mut app, request(Some(&key), "{}", &[])).await.status,
        201
    );
    let fingerprint = column(store_key(&key)).await;
    assert_eq!(fingerprint.len(), 16);
    fingerprint
}

/// Rows written by the release before the fingerprint was sealed into the payload column keep
/// replaying on PostgreSQL (the upgrade policy of `docs/stores.md`).
#[tokio::test]
async fn postgres_rows_of_the_unsealed_layout_replay() {
    let Some(url) = postgres_url() else { return };
    let store = PostgresStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let client = std::sync::Arc::new(client);
    let reader = client.clone();
    let fingerprint = fingerprint_of_empty_object(store.clone(), |key| async move {
        reader
            .query_one(
                "SELECT fingerprint FROM idempotency_records WHERE key = $1",
                &[&key],
            )
            .await
            .unwrap()
            .get(0)
    })
    .await;
    let mut keys = Vec::new();
    for fingerprint in [Some(fingerprint), None] {
        let key = tower_idempotency::store::conformance::fresh_key("old-pg");
        let (fingerprint, payload) = old_row(fingerprint);
        client
            .execute(
                "INSERT INTO idempotency_records (key, owner, completed, fingerprint, payload, expires_at) \
                 VALUES ($1, NULL, true, $2, $3, now() + interval '1 hour')",
                &[&store_key(&key), &fingerprint, &payload],
            )
            .await
            .unwrap();
        keys.push(key);
    }
    old_rows_replay(store, &keys[0], &keys[1]).await;
}

/// The same on SQLite.
#[tokio::test]
async fn sqlite_rows_of_the_unsealed_layout_replay() {
    use tower_idempotency::store::SqliteStore;
    let dir = support::servers::TempDir::new("old-sqlite-rows");
    let path = dir.path().join("old.db");
    // No replay cache: every replay reads the row.
    let store = SqliteStore::builder(&path)
        .replay_cache_bytes(0)
        .open()
        .await
        .unwrap();
    let db = std::sync::Arc::new(std::sync::Mutex::new(
        rusqlite::Connection::open(&path).unwrap(),
    ));
    let reader = db.clone();
    let fingerprint = fingerprint_of_empty_object(store.clone(), |key| async move {
        reader
            .lock()
            .unwrap()
            .query_row(
                "SELECT fingerprint FROM idempotency_records WHERE key = ?1",
                [key],
                |row| row.get(0),
            )
            .unwrap()
    })
    .await;
    let mut keys = Vec::new();
    for fingerprint in [Some(fingerprint), None] {
        let key = tower_idempotency::store::conformance::fresh_key("old-sqlite");
        let (fingerprint, payload) = old_row(fingerprint);
        db.lock()
            .unwrap()
            .execute(
                "INSERT INTO idempotency_records (key, owner, completed, fingerprint, payload, expires_at) \
                 VALUES (?1, NULL, 1, ?2, ?3, CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER) + 3600000)",
                rusqlite::params![store_key(&key), fingerprint, payload],
            )
            .unwrap();
        keys.push(key);
    }
    old_rows_replay(store, &keys[0], &keys[1]).await;
}

fn fastrand_u32() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now()) as u32
}
