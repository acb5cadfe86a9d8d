//! A record damaged in the store, or written by a newer version, proves that its key was used:
//! it is never answered by running the handler again (under either store-error policy) and never
//! replayed as a success. Damaged: 500 `#unreadable-record`; newer: 503 `#unknown-record-version`
//! with `Retry-After` (an instance that can read it may answer the retry).
//!
//! Each case stores a payment through the layer on a real server, changes the stored bytes with
//! a plain client, then retries three times.

use crate::support;

use http::Method;
use support::servers::{postgres_url, raw_redis, redis_url};
use support::{app, request, send, App};
use tower_idempotency::store::{PostgresStore, RedisStore, Store};
use tower_idempotency::{admin, IdempotencyLayer, OnStoreError};

const BODY: &str = r#"{"amount": 1000, "currency": "usd", "note": "a body long enough to cut"}"#;

/// What a retry should get after the damage.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Damaged,
    Newer,
}

fn policies() -> [OnStoreError; 2] {
    [OnStoreError::FailClosed, OnStoreError::FailOpen]
}

/// Stores one payment under a fresh key; returns the app, its probe, the key and the store key.
async fn stored<St: Store + Clone>(
    store: St,
    policy: OnStoreError,
    case: &str,
) -> (App<St>, support::Probe, String, String) {
    let (mut app, probe) = app(IdempotencyLayer::with_store(store).on_store_error(policy));
    let key = tower_idempotency::store::conformance::fresh_key(case);
    let first = send(&mut app, request(Some(&key), BODY, &[])).await;
    assert_eq!(first.status, 201);
    let store_key = admin::http_key("", &Method::POST, "/payments", &key);
    (app, probe, key, store_key)
}

async fn three_retries<St: Store + Clone>(
    app: &mut App<St>,
    probe: &support::Probe,
    key: &str,
    expect: Expect,
    what: &str,
) {
    for attempt in 0..3 {
        let retry = send(app, request(Some(key), BODY, &[])).await;
        assert!(!retry.replayed(), "{what}: attempt {attempt} replayed");
        match expect {
            Expect::Damaged => retry.assert_problem(500, "unreadable-record"),
            Expect::Newer => {
                retry.assert_problem(503, "unknown-record-version");
                assert!(retry.headers.contains_key("retry-after"), "{what}");
            }
        }
    }
    assert_eq!(probe.executions(), 1, "{what}: the handler ran again");
}

async fn redis_store() -> Option<(RedisStore, String)> {
    let url = redis_url()?;
    Some((RedisStore::connect(&url).await.unwrap(), url))
}

/// Rewrites the Redis value of `store_key`, keeping its TTL.
async fn damage_redis(url: &str, store_key: &str, change: impl FnOnce(&mut Vec<u8>)) {
    let mut redis = raw_redis(url).await;
    let redis_key = format!("idempotency:{store_key}");
    let mut value: Vec<u8> = redis::cmd("GET")
        .arg(&redis_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    change(&mut value);
    let () = redis::cmd("SET")
        .arg(&redis_key)
        .arg(value)
        .arg("KEEPTTL")
        .query_async(&mut redis)
        .await
        .unwrap();
}

type Damage = (&'static str, Expect, fn(&mut Vec<u8>));

/// The Redis value is `'R' version=2 checksum:u64 fingerprint-flag [fingerprint] payload`, the
/// payload an HTTP record `"TI" version …`; the checksum covers everything after it.
const REDIS_DAMAGE: &[Damage] = &[
    ("envelope tag byte", Expect::Damaged, |v| v[0] = b'X'),
    ("envelope version byte zeroed", Expect::Damaged, |v| {
        v[1] = 0
    }),
    ("envelope version from the future", Expect::Newer, |v| {
        v[1] = 200
    }),
    ("checksum byte", Expect::Damaged, |v| v[2] ^= 1),
    ("fingerprint flag byte", Expect::Damaged, |v| v[10] = 7),
    ("fingerprint flag cleared", Expect::Damaged, |v| v[10] = 0),
    ("value cut inside the fingerprint", Expect::Damaged, |v| {
        v.truncate(10)
    }),
    ("value cut inside the body", Expect::Damaged, |v| {
        v.truncate(v.len() - 20)
    }),
    ("a body byte flipped", Expect::Damaged, |v| {
        let last = v.len() - 1;
        v[last] ^= 0x20;
    }),
    ("record version from the future", Expect::Newer, |v| {
        reseal(&mut v[2..], |payload| payload[2] = 200)
    }),
];

/// Changes the payload inside a sealed value (`checksum flag [fingerprint] payload`, as the
/// stores write it) and writes the checksum it then has: what a newer release would write.
fn reseal(sealed: &mut [u8], change: impl FnOnce(&mut [u8])) {
    use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};
    let payload_at = if sealed[8] == 1 { 25 } else { 9 };
    change(&mut sealed[payload_at..]);
    let sum = xxh3_64_with_seed(&sealed[payload_at..], xxh3_64(&sealed[8..payload_at]));
    sealed[..8].copy_from_slice(&sum.to_be_bytes());
}

#[tokio::test]
async fn damaged_redis_records_never_run_the_handler_again() {
    let Some((store, url)) = redis_store().await else {
        return;
    };
    for &(what, expect, change) in REDIS_DAMAGE {
        for policy in policies() {
            let (mut app, probe, key, store_key) = stored(store.clone(), policy, "redis").await;
            damage_redis(&url, &store_key, change).await;
            let what = format!("{what} ({policy:?})");
            three_retries(&mut app, &probe, &key, expect, &what).await;
        }
    }
}

async fn postgres_store() -> Option<(PostgresStore, tokio_postgres::Client)> {
    let url = postgres_url()?;
    let store = PostgresStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    Some((store, client))
}

/// Each damage is an `UPDATE … WHERE key = $1` of the record's row.
const POSTGRES_DAMAGE: &[(&str, Expect, &str)] = &[
    (
        "a 15-byte fingerprint",
        Expect::Damaged,
        "fingerprint = substring(fingerprint from 1 for 15)",
    ),
    ("a NULL payload", Expect::Damaged, "payload = NULL"),
    (
        "payload cut inside the body",
        Expect::Damaged,
        "payload = substring(payload from 1 for length(payload) - 20)",
    ),
    ("a NULL fingerprint", Expect::Damaged, "fingerprint = NULL"),
    ("the completed flag cleared", Expect::Damaged, "completed = false"),
    (
        "a payload byte flipped",
        Expect::Damaged,
        "payload = set_byte(payload, length(payload) - 1, get_byte(payload, length(payload) - 1) # 1)",
    ),
    (
        "a row version from the future",
        Expect::Newer,
        "payload = set_byte(payload, 2, 241)",
    ),
];

#[tokio::test]
async fn damaged_postgres_rows_never_run_the_handler_again() {
    let Some((store, client)) = postgres_store().await else {
        return;
    };
    for &(what, expect, set) in POSTGRES_DAMAGE {
        for policy in policies() {
            let (mut app, probe, key, store_key) = stored(store.clone(), policy, "pg").await;
            let sql = format!("UPDATE idempotency_records SET {set} WHERE key = $1");
            assert_eq!(client.execute(&sql, &[&store_key]).await.unwrap(), 1);
            let what = format!("{what} ({policy:?})");
            three_retries(&mut app, &probe, &key, expect, &what).await;
        }
    }
    // A newer release's record inside a row this release reads: its adapter format is newer.
    for policy in policies() {
        let (mut app, probe, key, store_key) = stored(store.clone(), policy, "pg").await;
        let row = client
            .query_one(
                "SELECT payload FROM idempotency_records WHERE key = $1",
                &[&store_key],
            )
            .await
            .unwrap();
        let mut payload: Vec<u8> = row.get(0);
        reseal(&mut payload[3..], |record| record[2] = 200);
        let sql = "UPDATE idempotency_records SET payload = $2 WHERE key = $1";
        assert_eq!(
            client.execute(sql, &[&store_key, &payload]).await.unwrap(),
            1
        );
        let what = format!("record version from the future ({policy:?})");
        three_retries(&mut app, &probe, &key, Expect::Newer, &what).await;
    }
}

mod consumer {
    use super::*;
    use tower::{service_fn, BoxError, ServiceExt};
    use tower_idempotency::consumer::{ConsumerError, IdempotentConsumerLayer, Identity};

    type Message = (String, u64);

    /// Delivers `(id, amount)` through a consumer on `store` whose handler answers the amount
    /// and counts its runs.
    async fn deliver(
        store: &RedisStore,
        runs: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
        message: &Message,
    ) -> Result<tower_idempotency::consumer::Delivery<u64>, ConsumerError<BoxError>> {
        let runs = runs.clone();
        let handler = service_fn(move |(_, amount): Message| {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Ok::<_, BoxError>(amount) }
        });
        let layer = IdempotentConsumerLayer::with_store(
            |m: &Message| Identity::new(m.0.clone()).scope("damaged"),
            store.clone(),
        );
        tower::Layer::layer(&layer, handler)
            .oneshot(message.clone())
            .await
    }

    /// A consumer's stored outcome with a digit changed is refused, never delivered as a
    /// duplicate with another value; a damaged envelope is `Corrupt` (not a store outage), one
    /// from a newer release `UnknownFormat`; the handler never runs again.
    #[tokio::test]
    async fn damaged_consumer_outcomes_are_refused_not_redelivered() {
        let Some((store, url)) = redis_store().await else {
            return;
        };
        let cases: &[Damage] = &[
            ("a digit of the outcome changed", Expect::Damaged, |v| {
                let at = v.iter().rposition(|b| *b == b'4').unwrap();
                v[at] = b'5';
            }),
            ("the envelope tag byte", Expect::Damaged, |v| v[0] = b'Z'),
            ("the envelope version from the future", Expect::Newer, |v| {
                v[1] = 9
            }),
        ];
        for &(what, expect, change) in cases {
            let runs = std::sync::Arc::default();
            let id = tower_idempotency::store::conformance::fresh_key("consumer");
            let message = (id.clone(), 1234);
            assert!(deliver(&store, &runs, &message).await.unwrap().ran());
            damage_redis(&url, &admin::consumer_key("damaged", &id), change).await;
            for _ in 0..3 {
                match deliver(&store, &runs, &message).await {
                    Err(ConsumerError::UnknownFormat { .. }) if matches!(expect, Expect::Newer) => {
                    }
                    Err(ConsumerError::Corrupt(_)) if matches!(expect, Expect::Damaged) => {}
                    other => panic!("{what}: {other:?}"),
                }
            }
            assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1, "{what}");
        }
    }
}

/// Each damage rewrites the record's row with a plain SQLite connection.
type SqliteDamage = (&'static str, Expect, fn(&rusqlite::Connection, &str));

const SQLITE_DAMAGE: &[SqliteDamage] = &[
    ("a 15-byte fingerprint", Expect::Damaged, |db, key| {
        db.execute(
            "UPDATE idempotency_records SET fingerprint = substr(fingerprint, 1, 15) WHERE key = ?1",
            [key],
        )
        .unwrap();
    }),
    ("a NULL payload", Expect::Damaged, |db, key| {
        db.execute(
            "UPDATE idempotency_records SET payload = NULL WHERE key = ?1",
            [key],
        )
        .unwrap();
    }),
    ("the completed flag cleared", Expect::Damaged, |db, key| {
        db.execute(
            "UPDATE idempotency_records SET completed = 0 WHERE key = ?1",
            [key],
        )
        .unwrap();
    }),
    ("a payload byte flipped", Expect::Damaged, |db, key| {
        let mut payload: Vec<u8> = db
            .query_row(
                "SELECT payload FROM idempotency_records WHERE key = ?1",
                [key],
                |row| row.get(0),
            )
            .unwrap();
        payload[40] ^= 1;
        db.execute(
            "UPDATE idempotency_records SET payload = ?2 WHERE key = ?1",
            rusqlite::params![key, payload],
        )
        .unwrap();
    }),
    (
        "the payload turned into text",
        Expect::Damaged,
        |db, key| {
            db.execute(
                "UPDATE idempotency_records SET payload = CAST(payload AS TEXT) WHERE key = ?1",
                [key],
            )
            .unwrap();
        },
    ),
    (
        "the fingerprint turned into text",
        Expect::Damaged,
        |db, key| {
            db.execute(
                "UPDATE idempotency_records SET fingerprint = 'not a fingerprint' WHERE key = ?1",
                [key],
            )
            .unwrap();
        },
    ),
    ("payload cut inside the body", Expect::Damaged, |db, key| {
        db.execute(
            "UPDATE idempotency_records SET payload = substr(payload, 1, length(payload) - 20) WHERE key = ?1",
            [key],
        )
        .unwrap();
    }),
    (
        "record version from the future",
        Expect::Newer,
        |db, key| {
            let mut payload: Vec<u8> = db
                .query_row(
                    "SELECT payload FROM idempotency_records WHERE key = ?1",
                    [key],
                    |row| row.get(0),
                )
                .unwrap();
            reseal(&mut payload[3..], |record| record[2] = 200);
            db.execute(
                "UPDATE idempotency_records SET payload = ?2 WHERE key = ?1",
                rusqlite::params![key, payload],
            )
            .unwrap();
        },
    ),
];

#[tokio::test]
async fn damaged_sqlite_rows_never_run_the_handler_again() {
    use tower_idempotency::store::SqliteStore;
    let dir = support::servers::TempDir::new("damaged-sqlite");
    let path = dir.path().join("damaged.db");
    let db = rusqlite::Connection::open(&path).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    for &(what, expect, damage) in SQLITE_DAMAGE {
        for policy in policies() {
            // No replay cache: each retry reads the damaged row.
            let store = SqliteStore::builder(&path)
                .replay_cache_bytes(0)
                .open()
                .await
                .unwrap();
            let (mut app, probe, key, store_key) = stored(store, policy, "sqlite").await;
            damage(&db, &store_key);
            let what = format!("{what} ({policy:?})");
            three_retries(&mut app, &probe, &key, expect, &what).await;
        }
    }
}

/// Another payment under the same key: a request the stored record must never answer.
const OTHER_BODY: &str = r#"{"amount": 99999, "currency": "eur", "note": "another payment"}"#;

/// A record whose fingerprint was damaged answers 500 `#unreadable-record` to the original
/// payload and to another one alike: never 422 to the original (a flipped bit), never the
/// stored success to another payload (a NULL read as "no fingerprint"), never a second run.
async fn fingerprint_damage_is_unreadable<St: Store + Clone>(
    app: &mut App<St>,
    probe: &support::Probe,
    key: &str,
    what: &str,
) {
    for body in [BODY, OTHER_BODY, BODY] {
        let retry = send(app, request(Some(key), body, &[])).await;
        assert!(!retry.replayed(), "{what}: replayed to {body}");
        retry.assert_problem(500, "unreadable-record");
    }
    assert_eq!(probe.executions(), 1, "{what}: the handler ran again");
}

/// The SQL damages of a fingerprint column: set to NULL, one bit flipped.
const POSTGRES_FINGERPRINT_DAMAGE: &[(&str, &str)] = &[
    ("a NULL fingerprint", "fingerprint = NULL"),
    (
        "a bit of the fingerprint flipped",
        "fingerprint = set_byte(fingerprint, 5, get_byte(fingerprint, 5) # 16)",
    ),
];

#[tokio::test]
async fn a_damaged_postgres_fingerprint_is_an_unreadable_record() {
    let Some((store, client)) = postgres_store().await else {
        return;
    };
    for &(what, set) in POSTGRES_FINGERPRINT_DAMAGE {
        let (mut app, probe, key, store_key) =
            stored(store.clone(), OnStoreError::FailClosed, "pg-fp").await;
        let sql = format!("UPDATE idempotency_records SET {set} WHERE key = $1");
        assert_eq!(client.execute(&sql, &[&store_key]).await.unwrap(), 1);
        fingerprint_damage_is_unreadable(&mut app, &probe, &key, what).await;
    }
}

#[tokio::test]
async fn a_damaged_sqlite_fingerprint_is_an_unreadable_record() {
    use tower_idempotency::store::SqliteStore;
    let dir = support::servers::TempDir::new("damaged-sqlite-fp");
    let path = dir.path().join("damaged.db");
    let db = rusqlite::Connection::open(&path).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    for what in ["a NULL fingerprint", "a bit of the fingerprint flipped"] {
        // No replay cache: each retry reads the damaged row.
        let store = SqliteStore::builder(&path)
            .replay_cache_bytes(0)
            .open()
            .await
            .unwrap();
        let (mut app, probe, key, store_key) =
            stored(store, OnStoreError::FailClosed, "sqlite-fp").await;
        if what.contains("flipped") {
            let fingerprint: Vec<u8> = db
                .query_row(
                    "SELECT fingerprint FROM idempotency_records WHERE key = ?1",
                    [&store_key],
                    |row| row.get(0),
                )
                .unwrap();
            let mut flipped = fingerprint.clone();
            flipped[5] ^= 0x10;
            db.execute(
                "UPDATE idempotency_records SET fingerprint = ?2 WHERE key = ?1",
                rusqlite::params![store_key, flipped],
            )
            .unwrap();
        } else {
            let sql = "UPDATE idempotency_records SET fingerprint = NULL WHERE key = ?1";
            assert_eq!(db.execute(sql, [&store_key]).unwrap(), 1);
        }
        fingerprint_damage_is_unreadable(&mut app, &probe, &key, what).await;
    }
}

/// Where the fingerprint starts in a Redis value: `'R' 1 flag fingerprint …` (format 1),
/// `'R' 2 checksum:u64 flag fingerprint …` (format 2).
fn redis_fingerprint_at(value: &[u8]) -> usize {
    match value[1] {
        1 => 3,
        _ => 11,
    }
}

/// The Redis value keeps its fingerprint under the value's checksum: a flipped bit in it is
/// damage, not another payload's fingerprint.
#[tokio::test]
async fn a_damaged_redis_fingerprint_is_an_unreadable_record() {
    let Some((store, url)) = redis_store().await else {
        return;
    };
    let (mut app, probe, key, store_key) =
        stored(store, OnStoreError::FailClosed, "redis-fp").await;
    damage_redis(&url, &store_key, |v| {
        let at = redis_fingerprint_at(v) + 7;
        v[at] ^= 0x10;
    })
    .await;
    fingerprint_damage_is_unreadable(&mut app, &probe, &key, "redis fingerprint bit").await;
}

/// A chunked record (format 4: a chunk table, then the chunks) damaged in each store's raw
/// value: a chunk changed, missing or added, the count changed. Cut or changed in place, its
/// checksums find it; rewritten with every checksum made right again (as a writer of a
/// malformed record would), its chunk table does. Either way 500 `#unreadable-record`, never a
/// cut or a changed replay, never a second run.
mod chunked {
    use super::*;
    use crate::chunked_records::{frames, post, service};
    use bytes::Bytes;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use tower::{Service, ServiceExt};

    /// Where a record's chunk table starts: after its envelope, flags, status and header lists.
    fn table_at(record: &[u8]) -> usize {
        assert_eq!(&record[..3], b"TI\x04", "a chunked record");
        let u16_at = |at: usize| u16::from_be_bytes([record[at], record[at + 1]]) as usize;
        let u32_at =
            |at: usize| u32::from_be_bytes(record[at..at + 4].try_into().unwrap()) as usize;
        let flags = record[15];
        let mut pos = 18;
        let lists = if flags & 2 != 0 { 3 } else { 2 };
        for _ in 0..lists {
            let count = u16_at(pos);
            pos += 2;
            for _ in 0..count {
                pos += 2 + u16_at(pos);
                pos += 4 + u32_at(pos);
            }
        }
        pos
    }

    /// A damage to a chunked record (given where its table starts), and whether the checksums
    /// are written again after it.
    type ChunkDamage = (&'static str, bool, fn(&mut Vec<u8>, usize));

    fn count_plus(record: &mut [u8], at: usize, delta: i64) {
        let count = u32::from_be_bytes(record[at..at + 4].try_into().unwrap());
        let count = (i64::from(count) + delta) as u32;
        record[at..at + 4].copy_from_slice(&count.to_be_bytes());
    }

    const DAMAGE: &[ChunkDamage] = &[
        ("a byte of the last chunk changed", false, |r, _| {
            let last = r.len() - 1;
            r[last] ^= 0x20;
        }),
        ("the last chunk cut off", false, |r, _| {
            r.truncate(r.len() - 9)
        }),
        ("the chunk count one more", false, |r, at| {
            count_plus(r, at, 1)
        }),
        ("a chunk's length changed", false, |r, at| r[at + 7] ^= 1),
        ("the last chunk missing, resealed", true, |r, _| {
            r.truncate(r.len() - 9)
        }),
        ("an extra chunk's bytes, resealed", true, |r, _| {
            r.extend_from_slice(b"data: 4\n\n")
        }),
        ("the chunk count one more, resealed", true, |r, at| {
            count_plus(r, at, 1)
        }),
        ("the chunk count one less, resealed", true, |r, at| {
            count_plus(r, at, -1)
        }),
        ("the chunk count zeroed, resealed", true, |r, at| {
            r[at..at + 4].copy_from_slice(&[0; 4])
        }),
        ("a chunk's length zeroed, resealed", true, |r, at| {
            r[at + 4..at + 8].copy_from_slice(&[0; 4])
        }),
    ];

    /// Applies `damage` to the record inside a store's value (its sealed part starting at
    /// `sealed_at`: `checksum:u64 flag [fingerprint] record`); with `reseal`, writes the
    /// record's envelope (length, checksum) and the value's checksum again.
    fn damage_value(value: &mut Vec<u8>, sealed_at: usize, (_, reseal, damage): ChunkDamage) {
        use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};
        let payload_at = sealed_at + if value[sealed_at + 8] == 1 { 25 } else { 9 };
        let mut record = value.split_off(payload_at);
        let at = table_at(&record);
        damage(&mut record, at);
        if reseal {
            let len = (record.len() - 15) as u32;
            let hash = xxh3_64(&record[15..]);
            record[3..7].copy_from_slice(&len.to_be_bytes());
            record[7..15].copy_from_slice(&hash.to_be_bytes());
            let sum = xxh3_64_with_seed(&record, xxh3_64(&value[sealed_at + 8..]));
            value[sealed_at..sealed_at + 8].copy_from_slice(&sum.to_be_bytes());
        }
        value.extend_from_slice(&record);
    }

    /// The three chunks the handler answers.
    fn events() -> Arc<Vec<Bytes>> {
        Arc::new(
            [&b"data: 1\n\n"[..], b"data: 2\n\n", b"data: 3\n\n"]
                .map(Bytes::from_static)
                .to_vec(),
        )
    }

    /// Stores the events under a fresh key on `store`, lets `damage` change the stored value
    /// (given the store key), then retries three times: 500 `#unreadable-record` each time,
    /// the handler run once.
    async fn damaged_then_retried<St, F>(store: St, what: &str, damage: F)
    where
        St: Store + Clone + Send + Sync + 'static,
        F: AsyncFnOnce(&str),
    {
        let (mut service, runs) = service(store, events());
        let key = tower_idempotency::store::conformance::fresh_key("chunked-damage");
        let first = service
            .ready()
            .await
            .unwrap()
            .call(post(&key))
            .await
            .unwrap();
        assert_eq!(frames(first).await.0, *events());
        damage(&admin::http_key("", &Method::POST, "/exports", &key)).await;
        for attempt in 0..3 {
            let retry = service
                .ready()
                .await
                .unwrap()
                .call(post(&key))
                .await
                .unwrap();
            assert_eq!(retry.status(), 500, "{what}: attempt {attempt}");
            let (body, replayed) = frames(retry).await;
            assert!(!replayed, "{what}");
            let problem: serde_json::Value = serde_json::from_slice(&body.concat()).unwrap();
            assert!(
                problem["type"]
                    .as_str()
                    .unwrap()
                    .ends_with("#unreadable-record"),
                "{what}: {problem}"
            );
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "{what}: the handler ran again"
        );
    }

    #[tokio::test]
    async fn damaged_chunked_redis_records_are_unreadable() {
        let Some((store, url)) = redis_store().await else {
            return;
        };
        for &damage in DAMAGE {
            damaged_then_retried(store.clone(), damage.0, async |store_key: &str| {
                damage_redis(&url, store_key, |v| damage_value(v, 2, damage)).await
            })
            .await;
        }
    }

    #[tokio::test]
    async fn damaged_chunked_redis_cluster_records_are_unreadable() {
        use redis::AsyncCommands;
        let Some(urls) = support::servers::redis_cluster_urls() else {
            return;
        };
        let store = RedisStore::connect_cluster(&urls).await.unwrap();
        let client = redis::cluster::ClusterClient::new(urls).unwrap();
        let mut cluster = client.get_async_connection().await.unwrap();
        for &damage in DAMAGE {
            damaged_then_retried(store.clone(), damage.0, async |store_key: &str| {
                let redis_key = format!("idempotency:{store_key}");
                let mut value: Vec<u8> = cluster.get(&redis_key).await.unwrap();
                damage_value(&mut value, 2, damage);
                let () = redis::cmd("SET")
                    .arg(&redis_key)
                    .arg(value)
                    .arg("KEEPTTL")
                    .query_async(&mut cluster)
                    .await
                    .unwrap();
            })
            .await;
        }
    }

    #[tokio::test]
    async fn damaged_chunked_postgres_rows_are_unreadable() {
        let Some((store, client)) = postgres_store().await else {
            return;
        };
        for &damage in DAMAGE {
            damaged_then_retried(store.clone(), damage.0, async |store_key: &str| {
                let select = "SELECT payload FROM idempotency_records WHERE key = $1";
                let row = client.query_one(select, &[&store_key]).await.unwrap();
                let mut payload: Vec<u8> = row.get(0);
                damage_value(&mut payload, 3, damage);
                let update = "UPDATE idempotency_records SET payload = $2 WHERE key = $1";
                let updated = client.execute(update, &[&store_key, &payload]).await;
                assert_eq!(updated.unwrap(), 1);
            })
            .await;
        }
    }

    #[tokio::test]
    async fn damaged_chunked_sqlite_rows_are_unreadable() {
        use tower_idempotency::store::SqliteStore;
        let dir = support::servers::TempDir::new("damaged-chunked-sqlite");
        let path = dir.path().join("damaged.db");
        let db = rusqlite::Connection::open(&path).unwrap();
        db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        // No replay cache: each retry reads the damaged row.
        let store = SqliteStore::builder(&path)
            .replay_cache_bytes(0)
            .open()
            .await
            .unwrap();
        for &damage in DAMAGE {
            damaged_then_retried(store.clone(), damage.0, async |store_key: &str| {
                let select = "SELECT payload FROM idempotency_records WHERE key = ?1";
                let mut payload: Vec<u8> = db.query_row(select, [store_key], |r| r.get(0)).unwrap();
                damage_value(&mut payload, 3, damage);
                let update = "UPDATE idempotency_records SET payload = ?2 WHERE key = ?1";
                let updated = db.execute(update, rusqlite::params![store_key, payload]);
                assert_eq!(updated.unwrap(), 1);
            })
            .await;
        }
    }
}
