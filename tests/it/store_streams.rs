//! Live streams in the shared stores, against real servers: what each store writes for a
//! stream and removes when the claim ends (complete, release, an operator's delete), a reader
//! on another handle (another instance) following the owner's chunks, a damaged record answered
//! as damage, and a database from before streams getting their tables. The promises every store
//! keeps are `conformance::streams`, run by each store's own test file (`live_streams`).

use crate::support;

use std::time::Duration;

use bytes::Bytes;
use support::servers::{postgres_url, raw_redis, redis_url, TempDir};
use tower_idempotency::store::conformance::fresh_key;
use tower_idempotency::store::{
    ClaimOutcome, OwnerToken, PostgresStore, Record, RedisStore, SqliteStore, Store, StoreError,
    StreamRead,
};

const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(600);

async fn claimed<St: Store>(store: &St, key: &str) -> OwnerToken {
    match store.claim(key, LEASE).await.unwrap() {
        ClaimOutcome::Claimed(token) => token,
        other => panic!("{key} is fresh: {other:?}"),
    }
}

fn chunks(n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| Bytes::from(format!("event {i}\n\n")))
        .collect()
}

/// What a store holds for a key's stream, looked at from outside the store: its number of
/// stored pieces (Redis: whether the list exists; SQL: rows of `_streams` and `_chunks`).
trait Peek {
    async fn stream_rows(&self, key: &str) -> i64;
}

/// The owner appends through `a`, a reader on `b` (another instance) follows it, and each way
/// of ending the claim (complete, release, an operator's delete) leaves no stream stored.
async fn streams_end_with_their_claim<St: Store + Clone>(a: &St, b: &St, peek: &impl Peek) {
    for end in ["complete", "release", "delete"] {
        let key = fresh_key(&format!("stream-{end}"));
        let token = claimed(a, &key).await;
        let all = chunks(5);
        a.append_stream(&key, &token, 0, &all[..3], TTL)
            .await
            .unwrap();
        match b.read_stream(&key, 0).await.unwrap() {
            StreamRead::Live(got) => assert_eq!(got, &all[..3], "{end}"),
            other => panic!("{end}: the reader on another instance: {other:?}"),
        }
        a.append_stream(&key, &token, 3, &all[3..], TTL)
            .await
            .unwrap();
        match b.read_stream(&key, 3).await.unwrap() {
            StreamRead::Live(got) => assert_eq!(got, &all[3..], "{end}"),
            other => panic!("{end}: following on: {other:?}"),
        }
        assert!(
            peek.stream_rows(&key).await > 0,
            "{end}: the stream is stored"
        );
        match end {
            "complete" => a
                .complete(&key, &token, Record::new(Some(9), "done"), TTL)
                .await
                .unwrap(),
            "release" => a.release(&key, &token).await.unwrap(),
            _ => assert!(a.delete(&key).await.unwrap()),
        }
        assert_eq!(peek.stream_rows(&key).await, 0, "{end}: the stream is gone");
        match (end, b.read_stream(&key, 0).await.unwrap()) {
            ("complete", StreamRead::Completed(record)) => assert_eq!(record.payload(), "done"),
            ("release" | "delete", StreamRead::Absent) => {}
            (_, other) => panic!("{end}: then read {other:?}"),
        }
    }
    // A key that never streamed writes nothing for a stream.
    let key = fresh_key("stream-never");
    let token = claimed(a, &key).await;
    a.complete(&key, &token, Record::new(None, "plain"), TTL)
        .await
        .unwrap();
    assert_eq!(peek.stream_rows(&key).await, 0);
}

/// Retried appends racing each other (overlapping, some past the end: refused), from two
/// handles at once: the stream holds every chunk of every append that succeeded, in order,
/// each once.
async fn racing_retries_keep_every_acknowledged_chunk<St: Store + Clone>(a: &St, b: &St) {
    const TASKS: usize = 16;
    let all = chunks(32);
    for round in 0..8 {
        let key = fresh_key(&format!("stream-race-{round}"));
        let token = claimed(a, &key).await;
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(TASKS));
        let tasks: Vec<_> = (0..TASKS)
            .map(|j| {
                let store = if j % 2 == 0 { a.clone() } else { b.clone() };
                let (key, all, barrier) = (key.clone(), all.clone(), barrier.clone());
                tokio::spawn(async move {
                    let from = (j % 4) * 8;
                    let end = (from + 8 * (1 + j % 3)).min(all.len());
                    barrier.wait().await;
                    match store
                        .append_stream(&key, &token, from as u64, &all[from..end], TTL)
                        .await
                    {
                        Ok(()) => Some(end),
                        Err(StoreError::Backend(_)) => None,
                        Err(other) => panic!("append from {from}: {other:?}"),
                    }
                })
            })
            .collect();
        let mut acknowledged = 0;
        for task in tasks {
            acknowledged = acknowledged.max(task.await.unwrap().unwrap_or(0));
        }
        assert!(
            acknowledged >= 8,
            "round {round}: no append from 0 succeeded"
        );
        let mut held = Vec::new();
        loop {
            match b.read_stream(&key, held.len() as u64).await.unwrap() {
                StreamRead::Live(more) if more.is_empty() => break,
                StreamRead::Live(more) => held.extend(more),
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert!(
            held.len() >= acknowledged,
            "round {round}: {} chunks held, {acknowledged} acknowledged",
            held.len()
        );
        assert_eq!(
            held,
            &all[..held.len()],
            "round {round}: in order, each once"
        );
        a.release(&key, &token).await.unwrap();
    }
}

/// A completed key whose record is damaged reads as damage, never as a stream or as absent.
async fn a_damaged_record_reads_corrupt<St: Store>(
    store: &St,
    damage: impl AsyncFnOnce(&str),
    what: &str,
) {
    let key = fresh_key("stream-damaged");
    let token = claimed(store, &key).await;
    store
        .append_stream(&key, &token, 0, &chunks(2), TTL)
        .await
        .unwrap();
    store
        .complete(&key, &token, Record::new(Some(1), "a payment"), TTL)
        .await
        .unwrap();
    damage(&key).await;
    match store.read_stream(&key, 0).await {
        Err(StoreError::Corrupt(_)) => {}
        other => panic!("{what}: expected Corrupt, got {other:?}"),
    }
}

// Redis.

async fn redis() -> Option<(RedisStore, RedisStore, String)> {
    let url = redis_url()?;
    Some((
        RedisStore::connect(&url).await.unwrap(),
        RedisStore::connect(&url).await.unwrap(),
        url,
    ))
}

struct RedisPeek(String);

impl Peek for RedisPeek {
    async fn stream_rows(&self, key: &str) -> i64 {
        // The stream's key for a key without braces: `{<record key>}:stream`, 0xFF, the
        // record key (see `slot_key_of`).
        let record = format!("idempotency:{key}");
        let stream = [
            format!("{{{record}}}:stream").as_bytes(),
            b"\xff",
            record.as_bytes(),
        ]
        .concat();
        redis::cmd("EXISTS")
            .arg(stream)
            .query_async(&mut raw_redis(&self.0).await)
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_end_with_their_claim() {
    let Some((a, b, url)) = redis().await else {
        return;
    };
    streams_end_with_their_claim(&a, &b, &RedisPeek(url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_racing_retries_keep_every_acknowledged_chunk() {
    let Some((a, b, _)) = redis().await else {
        return;
    };
    racing_retries_keep_every_acknowledged_chunk(&a, &b).await;
}

#[tokio::test]
async fn redis_a_damaged_record_reads_corrupt() {
    let Some((store, _, url)) = redis().await else {
        return;
    };
    for (what, value) in [
        ("a flipped byte", None),
        ("not a record", Some(&b"Xgarbage"[..])),
        ("cut", Some(&b"R\x02"[..])),
    ] {
        let damage = async |key: &str| {
            let mut raw = raw_redis(&url).await;
            let record = format!("idempotency:{key}");
            let mut stored: Vec<u8> = redis::cmd("GET")
                .arg(&record)
                .query_async(&mut raw)
                .await
                .unwrap();
            match value {
                Some(value) => stored = value.to_vec(),
                None => *stored.last_mut().unwrap() ^= 1,
            }
            let () = redis::cmd("SET")
                .arg(&record)
                .arg(stored)
                .query_async(&mut raw)
                .await
                .unwrap();
        };
        a_damaged_record_reads_corrupt(&store, damage, what).await;
    }
}

/// A streamed key's completion ends its stream inside the completion script (one `DEL`, with
/// no point), on Redis 7 (no `IFEQ`) and Valkey (`IFEQ`, which a streamed claim leaves for
/// the script): a fresh key's commands are counted, unchanged, by `store_redis_commands`.
#[tokio::test]
async fn redis_a_streamed_keys_completion_deletes_its_stream_in_the_script() {
    let mut servers = Vec::new();
    if let Some(redis) = support::servers::own_redis("count the commands of") {
        servers.push(redis);
    }
    if let Some(valkey) = support::servers::own_valkey() {
        servers.push(valkey);
    }
    for server in servers {
        let url = server.url();
        let store = RedisStore::connect(&url).await.unwrap();
        // The first completion through the script loads it (a failed `EVALSHA`, then another).
        let mut tokens = Vec::new();
        for key in ["warm", "counted"] {
            let token = claimed(&store, key).await;
            store
                .append_stream(key, &token, 0, &chunks(2), TTL)
                .await
                .unwrap();
            tokens.push(token);
        }
        store
            .complete("warm", &tokens[0], Record::new(None, "done"), TTL)
            .await
            .unwrap();
        let (key, token) = ("counted", tokens[1]);
        let () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut raw_redis(&url).await)
            .await
            .unwrap();
        store
            .complete(key, &token, Record::new(None, "done"), TTL)
            .await
            .unwrap();
        assert_eq!(support::servers::command_calls(&url, "del").await, (1, 0));
        assert_eq!(
            support::servers::command_calls(&url, "evalsha").await,
            (1, 0)
        );
        assert_eq!(RedisPeek(url).stream_rows(key).await, 0);
    }
}

/// A duplicate waiting on another instance marks the claim (`W` appended, so that the
/// completion publishes): the stream stays live to readers, the owner still appends, and the
/// completion both wakes the waiter and ends the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_marked_claim_streams_on() {
    let Some((a, b, url)) = redis().await else {
        return;
    };
    let key = fresh_key("stream-marked");
    let token = claimed(&a, &key).await;
    let all = chunks(4);
    a.append_stream(&key, &token, 0, &all[..2], TTL)
        .await
        .unwrap();
    let claim: Vec<u8> = redis::cmd("GET")
        .arg(format!("idempotency:{key}"))
        .query_async(&mut raw_redis(&url).await)
        .await
        .unwrap();
    // Starts b's subscriber and gives it time to subscribe (as `store_redis_commands` does):
    // a waiter marks a claim only while it listens.
    let _ = tokio::time::timeout(Duration::from_millis(300), b.wait("nobody", 0)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiter = {
        let (b, key) = (b.clone(), key.clone());
        tokio::spawn(async move { b.wait(&key, 6).await })
    };
    let mut marked = false;
    for _ in 0..100 {
        let value: Vec<u8> = redis::cmd("GET")
            .arg(format!("idempotency:{key}"))
            .query_async(&mut raw_redis(&url).await)
            .await
            .unwrap();
        if value != claim {
            assert_eq!(value.last(), Some(&b'W'));
            marked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(marked, "the waiter marked the claim");
    a.append_stream(&key, &token, 2, &all[2..], TTL)
        .await
        .unwrap();
    match b.read_stream(&key, 0).await.unwrap() {
        StreamRead::Live(got) => assert_eq!(got, all),
        other => panic!("a marked claim's stream: {other:?}"),
    }
    a.complete(&key, &token, Record::new(None, "done"), TTL)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .expect("the completion woke the waiter")
        .unwrap();
    assert_eq!(RedisPeek(url).stream_rows(&key).await, 0);
}

/// Redis goes away while a key streams: appends and reads fail as store errors (never a
/// false `Absent`, `NotLive` or empty `Live`); once it is back (without persistence: its keys
/// are gone), the key reads `Absent` and the lapsed owner's append is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_stream_through_an_outage_fails_as_a_store_error() {
    let Some(server) = support::servers::own_redis("stop") else {
        return;
    };
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let key = fresh_key("stream-outage");
    let token = claimed(&store, &key).await;
    let all = chunks(4);
    store
        .append_stream(&key, &token, 0, &all[..2], TTL)
        .await
        .unwrap();
    server.stop();
    match store.append_stream(&key, &token, 2, &all[2..], TTL).await {
        Err(StoreError::Backend(_)) => {}
        other => panic!("an append while Redis is down: {other:?}"),
    }
    match store.read_stream(&key, 0).await {
        Err(StoreError::Backend(_)) => {}
        other => panic!("a read while Redis is down: {other:?}"),
    }
    server.restart();
    let mut read = store.read_stream(&key, 0).await;
    for _ in 0..50 {
        if read.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        read = store.read_stream(&key, 0).await;
    }
    assert!(matches!(read, Ok(StreamRead::Absent)), "{read:?}");
    match store.append_stream(&key, &token, 2, &all[2..], TTL).await {
        Err(StoreError::LeaseLost) => {}
        other => panic!("an append after the claim was lost: {other:?}"),
    }
}

// PostgreSQL.

async fn postgres() -> Option<(PostgresStore, PostgresStore, tokio_postgres::Client)> {
    let url = postgres_url()?;
    let a = PostgresStore::connect(&url).await.unwrap();
    a.migrate().await.unwrap();
    let b = PostgresStore::connect(&url).await.unwrap();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    Some((a, b, client))
}

struct PostgresPeek(tokio_postgres::Client, &'static str);

impl Peek for PostgresPeek {
    async fn stream_rows(&self, key: &str) -> i64 {
        let t = self.1;
        let sql = format!(
            "SELECT (SELECT count(*) FROM {t}_streams WHERE key = $1) \
             + (SELECT count(*) FROM {t}_chunks WHERE key = $1)"
        );
        self.0.query_one(&sql, &[&key]).await.unwrap().get(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_streams_end_with_their_claim() {
    let Some((a, b, client)) = postgres().await else {
        return;
    };
    streams_end_with_their_claim(&a, &b, &PostgresPeek(client, "idempotency_records")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_racing_retries_keep_every_acknowledged_chunk() {
    let Some((a, b, _)) = postgres().await else {
        return;
    };
    racing_retries_keep_every_acknowledged_chunk(&a, &b).await;
}

#[tokio::test]
async fn postgres_a_damaged_record_reads_corrupt() {
    let Some((store, _, client)) = postgres().await else {
        return;
    };
    for set in [
        "payload = set_byte(payload, length(payload) - 1, get_byte(payload, length(payload) - 1) # 1)",
        "payload = NULL",
        "fingerprint = substring(fingerprint from 1 for 15)",
    ] {
        let damage = async |key: &str| {
            let sql = format!("UPDATE idempotency_records SET {set} WHERE key = $1");
            assert_eq!(client.execute(&sql, &[&key]).await.unwrap(), 1);
        };
        a_damaged_record_reads_corrupt(&store, damage, set).await;
    }
}

/// A database migrated before live streams (no `_streams` and `_chunks` tables) gets them
/// from `migrate`, which notices they are missing and creates them alone, without locking the
/// live records' table (a transaction reading it meanwhile, as every claim does, does not
/// hold the migration up); the purge deletes a crashed owner's stream once it expired.
#[tokio::test]
async fn postgres_migrate_adds_the_stream_tables_and_the_purge_ends_stale_streams() {
    let Some((store, _, client)) = postgres().await else {
        return;
    };
    let store = store.with_table("streams_upgrade").unwrap();
    store.migrate().await.unwrap();
    client
        .batch_execute("DROP TABLE streams_upgrade_streams; DROP TABLE streams_upgrade_chunks")
        .await
        .unwrap();
    let (reader, connection) =
        tokio_postgres::connect(&postgres_url().unwrap(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM streams_upgrade")
        .await
        .unwrap();
    store
        .migrate()
        .await
        .expect("migrate while a reader holds the table");
    reader.batch_execute("COMMIT").await.unwrap();
    let peek = PostgresPeek(client, "streams_upgrade");
    let key = fresh_key("stream-purge");
    let crashed = claimed(&store, &key).await;
    store
        .append_stream(&key, &crashed, 0, &chunks(3), Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(peek.stream_rows(&key).await, 4);
    tokio::time::sleep(Duration::from_millis(400)).await;
    while store.purge_expired(1000).await.unwrap() == 1000 {}
    assert_eq!(
        peek.stream_rows(&key).await,
        0,
        "the expired stream was purged"
    );
}

// SQLite.

struct SqlitePeek(std::path::PathBuf);

impl Peek for SqlitePeek {
    async fn stream_rows(&self, key: &str) -> i64 {
        let db = rusqlite::Connection::open(&self.0).unwrap();
        db.busy_timeout(Duration::from_secs(5)).unwrap();
        db.query_row(
            "SELECT (SELECT count(*) FROM idempotency_streams WHERE key = ?1) \
             + (SELECT count(*) FROM idempotency_chunks WHERE key = ?1)",
            [key],
            |row| row.get(0),
        )
        .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_streams_end_with_their_claim() {
    let dir = TempDir::new("streams-sqlite");
    let path = dir.path().join("streams.db");
    let (a, b) = (
        SqliteStore::open(&path).await.unwrap(),
        SqliteStore::open(&path).await.unwrap(),
    );
    streams_end_with_their_claim(&a, &b, &SqlitePeek(path)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_racing_retries_keep_every_acknowledged_chunk() {
    let dir = TempDir::new("streams-sqlite-race");
    let path = dir.path().join("race.db");
    let (a, b) = (
        SqliteStore::open(&path).await.unwrap(),
        SqliteStore::open(&path).await.unwrap(),
    );
    racing_retries_keep_every_acknowledged_chunk(&a, &b).await;
}

#[tokio::test]
async fn sqlite_a_damaged_record_reads_corrupt() {
    let dir = TempDir::new("streams-sqlite-damaged");
    let path = dir.path().join("damaged.db");
    // No replay cache: each read reads the damaged row.
    let store = SqliteStore::builder(&path)
        .replay_cache_bytes(0)
        .open()
        .await
        .unwrap();
    for set in [
        "payload = substr(payload, 1, length(payload) - 1)",
        "payload = NULL",
        "fingerprint = substr(fingerprint, 1, 15)",
    ] {
        let damage = async |key: &str| {
            let db = rusqlite::Connection::open(&path).unwrap();
            db.busy_timeout(Duration::from_secs(5)).unwrap();
            let sql = format!("UPDATE idempotency_records SET {set} WHERE key = ?1");
            assert_eq!(db.execute(&sql, [key]).unwrap(), 1);
        };
        a_damaged_record_reads_corrupt(&store, damage, set).await;
    }
}

/// A file written before live streams (no stream tables, same schema version) gets them when
/// a build with streams opens it; the purge deletes a crashed owner's expired stream.
#[tokio::test]
async fn sqlite_an_older_file_gets_the_stream_tables_and_the_purge_ends_stale_streams() {
    let dir = TempDir::new("streams-sqlite-upgrade");
    let path = dir.path().join("older.db");
    drop(SqliteStore::open(&path).await.unwrap());
    {
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch("DROP TABLE idempotency_streams; DROP TABLE idempotency_chunks")
            .unwrap();
    }
    let store = SqliteStore::builder(&path)
        .purge_every(None)
        .open()
        .await
        .unwrap();
    let key = fresh_key("stream-purge");
    let crashed = claimed(&store, &key).await;
    store
        .append_stream(&key, &crashed, 0, &chunks(3), Duration::from_millis(200))
        .await
        .unwrap();
    let peek = SqlitePeek(path);
    assert_eq!(peek.stream_rows(&key).await, 4);
    tokio::time::sleep(Duration::from_millis(400)).await;
    while store.purge_expired(1000).await.unwrap() == 1000 {}
    assert_eq!(
        peek.stream_rows(&key).await,
        0,
        "the expired stream was purged"
    );
}
