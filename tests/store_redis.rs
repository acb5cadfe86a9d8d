//! `RedisStore` against a real Redis server: the conformance suite and the fleet cases.

mod support;

use support::servers::{redis_url, RedisServer};
use support::shared_store;
use tower_idempotency::store::RedisStore;

async fn store() -> Option<RedisStore> {
    let url = redis_url()?;
    Some(RedisStore::connect(&url).await.expect("connect to redis"))
}

macro_rules! conformance {
    ($($case:ident),*) => {
        mod conformance {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let Some(store) = super::store().await else { return };
                    tower_idempotency::store::conformance::$case(&store).await;
                }
            )*
        }
    };
}

conformance!(
    claim_then_in_flight,
    complete_then_replay,
    release_then_reclaim,
    owner_checks,
    keys_are_independent,
    renew_extends_the_lease,
    lapsed_lease_is_taken_over_and_fenced,
    record_expires_after_ttl,
    concurrent_claims_have_one_winner,
    wait_returns_when_the_claim_ends
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_racing_for_one_key_have_one_winner() {
    let (Some(a), Some(b)) = (store().await, store().await) else {
        return;
    };
    shared_store::two_handles_race_for_one_key(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lapsed_lease_is_taken_over_by_another_instance_and_fenced() {
    let (Some(a), Some(b)) = (store().await, store().await) else {
        return;
    };
    shared_store::lapsed_lease_is_taken_over_by_another_instance(&a, &b).await;
}

#[tokio::test]
async fn records_survive_a_reconnect() {
    let Some(first) = store().await else { return };
    shared_store::records_survive_a_reconnect(first, async { store().await.unwrap() }).await;
}

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
