//! `RedisStore` on a server whose `SET` takes `IFEQ` (Valkey 8.1 and later; Redis 8.4 has it
//! too): a completion is then plain pipelined commands instead of the completion script. The
//! conformance suite and the shared-store cases run against a real Valkey, so that the plain
//! completion is held to the same promises as the script (the fence against a lapsed lease, a
//! completion retried after it was written, the recovery point's end, the wake-up); and the
//! command counts show which path each server takes.
//!
//! Needs `valkey-server` (8.1 or later) on the `PATH`; `.ci/run` builds one from Debian's
//! source package. Without it the tests say so and pass without running (and fail under CI).

use crate::support;

use std::time::Duration;

use support::servers::{command_calls as calls, valkey_url};
use tower_idempotency::store::{ClaimOutcome, Record, RecoveryPoint, RedisStore, Store};

async fn store() -> Option<RedisStore> {
    let url = valkey_url()?;
    Some(RedisStore::connect(&url).await.expect("connect to valkey"))
}

// The conformance suite and the cases of shared stores, on `store()`.
shared_store_suite!();

const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(600);

async fn claim_and_complete(store: &RedisStore, key: &str) {
    let ClaimOutcome::Claimed(token) = store.claim(key, LEASE).await.unwrap() else {
        panic!("{key} is fresh")
    };
    store
        .complete(key, &token, Record::new(Some(1), "done"), TTL)
        .await
        .unwrap();
}

/// On a server with `SET … IFEQ`, a completion runs no script: the claim's `SET` and the
/// completion's `SET`, and nothing beside it for a key without a recovery point or a waiting
/// duplicate (no `PEXPIRE`, no `PUBLISH`; on a server this test owns, so that no other test's
/// calls are counted).
#[tokio::test]
async fn a_completion_on_a_server_with_set_ifeq_is_plain_commands() {
    let Some(server) = support::servers::own_valkey() else {
        return;
    };
    let url = server.url();
    let store = RedisStore::connect(&url).await.unwrap();
    for key in ["plain-1", "plain-2"] {
        claim_and_complete(&store, key).await;
    }
    assert_eq!(calls(&url, "evalsha").await, (0, 0), "no script ran");
    assert_eq!(
        calls(&url, "set").await,
        (5, 0),
        "the connection's IFEQ probe, then a claim and a completion each"
    );
    assert_eq!(calls(&url, "pexpire").await.0, 0, "no point to end");
    assert_eq!(calls(&url, "publish").await.0, 0, "nobody waits");
    let replayed = store.claim("plain-1", LEASE).await.unwrap();
    assert!(
        matches!(replayed, ClaimOutcome::Completed(record) if record.payload() == "done"),
        "the record was written"
    );
}

/// A server without `SET … IFEQ` (Debian's Redis 7.0) refuses the first plain completion; that
/// completion and every later one on the store then go to the script, and both succeed.
#[tokio::test]
async fn a_server_without_set_ifeq_refuses_it_once_and_completions_use_the_script() {
    let Some(server) = support::servers::own_redis("count the commands of") else {
        return;
    };
    let url = server.url();
    let store = RedisStore::connect(&url).await.unwrap();
    let version: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut support::servers::raw_redis(&url).await)
        .await
        .unwrap();
    if version.contains("valkey_version") {
        support::servers::skip("redis-server is Valkey here: it takes SET IFEQ");
        return;
    }
    for key in ["scripted-1", "scripted-2", "scripted-3"] {
        claim_and_complete(&store, key).await;
    }
    // Three claims, one refused plain completion, then the script's own `SET` each time.
    let (set, refused) = calls(&url, "set").await;
    assert_eq!(refused, 1, "refused once, not per completion");
    assert_eq!(
        set,
        3 + 1 + 3,
        "three claims, the refusal and the script's three writes"
    );
    assert!(calls(&url, "evalsha").await.0 >= 3);
    for key in ["scripted-1", "scripted-2", "scripted-3"] {
        assert!(matches!(
            store.claim(key, LEASE).await.unwrap(),
            ClaimOutcome::Completed(_)
        ));
    }
}

/// The plain completion's point handling: a point saved under the claim is gone, or expires no
/// later than the record (the plain completion shortens it to the record's TTL), so a run of
/// the key after the record expired starts afresh; and a completion that lost its lease leaves
/// the successor's claim and point alone.
#[tokio::test]
async fn a_plain_completion_ends_the_point_with_the_record_and_a_lapsed_one_writes_nothing() {
    let Some(url) = valkey_url() else { return };
    let store = RedisStore::connect(&url).await.unwrap();
    let mut raw = support::servers::raw_redis(&url).await;
    let key = format!("point-ends-{}", std::process::id());
    let ClaimOutcome::Claimed(token) = store.claim(&key, LEASE).await.unwrap() else {
        panic!("fresh")
    };
    store
        .save_point(&key, &token, &RecoveryPoint::new("charged", "ch_1"), TTL)
        .await
        .unwrap();
    let pttl = |name: Vec<u8>| {
        let mut raw = raw.clone();
        async move {
            let ms: i64 = redis::cmd("PTTL")
                .arg(name)
                .query_async(&mut raw)
                .await
                .unwrap();
            ms
        }
    };
    // `{<slot part>}:point`, the byte 0xFF, then the whole record key.
    let point_key = [
        format!("{{idempotency:{key}}}:point").as_bytes(),
        b"\xff",
        format!("idempotency:{key}").as_bytes(),
    ]
    .concat();
    // The point is where this test looks for it (the store's naming), so "gone" below means
    // the completion ended it, not a wrong name.
    assert!(pttl(point_key.clone()).await > 0, "the saved point exists");
    let short = Duration::from_millis(300);
    store
        .complete(&key, &token, Record::new(Some(1), "done"), short)
        .await
        .unwrap();
    let record_ms = pttl(format!("idempotency:{key}").into_bytes()).await;
    let point_ms = pttl(point_key).await;
    assert!(record_ms > 0 && record_ms <= 300, "record PTTL {record_ms}");
    assert!(
        point_ms == -2 || (0..=record_ms).contains(&point_ms),
        "the point is gone or expires no later than the record: point {point_ms} ms, record {record_ms} ms"
    );
    // Past the record's TTL, a new run of the key finds no point.
    tokio::time::sleep(short * 2).await;
    let ClaimOutcome::Claimed(next) = store.claim(&key, LEASE).await.unwrap() else {
        panic!("the record expired")
    };
    assert_eq!(store.load_point(&key, &next).await.unwrap(), None);

    // A completion whose lease lapsed: the successor's claim and point stay.
    let lapsed = format!("point-lapsed-{}", std::process::id());
    let ClaimOutcome::Claimed(first) = store
        .claim(&lapsed, Duration::from_millis(50))
        .await
        .unwrap()
    else {
        panic!("fresh")
    };
    tokio::time::sleep(Duration::from_millis(120)).await;
    let ClaimOutcome::Claimed(second) = store.claim(&lapsed, LEASE).await.unwrap() else {
        panic!("the first lease lapsed")
    };
    let point = RecoveryPoint::new("successor", "kept");
    store
        .save_point(&lapsed, &second, &point, TTL)
        .await
        .unwrap();
    let late = store
        .complete(&lapsed, &first, Record::new(Some(1), "late"), TTL)
        .await;
    assert!(
        late.is_err(),
        "the lapsed owner's completion is refused: {late:?}"
    );
    assert_eq!(
        store.load_point(&lapsed, &second).await.unwrap(),
        Some(point)
    );
    store
        .complete(&lapsed, &second, Record::new(Some(1), "second"), TTL)
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&lapsed, LEASE).await.unwrap(),
        ClaimOutcome::Completed(record) if record.payload() == "second"
    ));
    let _: () = redis::cmd("DEL")
        .arg(format!("idempotency:{lapsed}"))
        .query_async(&mut raw)
        .await
        .unwrap();
}
