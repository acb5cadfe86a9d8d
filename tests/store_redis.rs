//! `RedisStore` against a real Redis server: the conformance suite and the fleet cases.

mod support;

use support::servers::{redis_url, RedisServer};
use support::shared_store;
use tower_idempotency::store::RedisStore;

async fn store() -> Option<RedisStore> {
    let url = redis_url()?;
    Some(RedisStore::connect(&url).await.expect("connect to redis"))
}

// The conformance suite and the cases of shared stores, on `store()`.
shared_store_suite!();

#[tokio::test]
async fn the_key_prefix_is_configurable_and_isolates_stores() {
    use tower_idempotency::store::{ClaimOutcome, Store};
    let (Some(a), Some(b)) = (store().await, store().await) else {
        return;
    };
    let (a, b) = (a.with_prefix("tenant-a:"), b.with_prefix("tenant-b:"));
    let lease = std::time::Duration::from_secs(30);
    assert!(matches!(
        a.claim("k", lease).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    assert!(matches!(
        b.claim("k", lease).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    let url = redis_url().unwrap();
    let mut raw = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg("tenant-a:k")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(exists, "records live under the prefix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_goes_away_and_comes_back() {
    if std::env::var_os("REDIS_URL").is_some() {
        eprintln!("skipped: REDIS_URL is an external server this test cannot stop");
        return;
    }
    let Some(server) = RedisServer::start() else {
        support::servers::unavailable("redis-server");
        return;
    };
    let store = RedisStore::connect(&server.url()).await.unwrap();
    shared_store::outage_then_recovery(&store, || server.stop(), || server.restart()).await;
}
