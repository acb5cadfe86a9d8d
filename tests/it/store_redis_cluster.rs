//! `RedisStore` against a real Redis Cluster of three masters started by the tests: the
//! conformance suite, the fleet cases, keys spread over every master, and a master restart.

use crate::support;

use std::time::{Duration, Instant};

use support::servers::{redis_cluster_urls, RedisCluster};
use support::{app, request, send};
use tower_idempotency::store::conformance::fresh_key;
use tower_idempotency::store::{ClaimOutcome, RedisStore, Store};
use tower_idempotency::{IdempotencyLayer, Settings};

async fn store() -> Option<RedisStore> {
    let urls = redis_cluster_urls()?;
    Some(
        RedisStore::connect_cluster(&urls)
            .await
            .expect("connect to the cluster"),
    )
}

// The conformance suite and the cases of shared stores, on `store()`.
shared_store_suite!();

async fn dbsize(url: &str) -> i64 {
    let mut connection = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("DBSIZE")
        .query_async(&mut connection)
        .await
        .unwrap()
}

/// Keys spread over the slots of every master: the store is cluster-aware, not pinned to the
/// node it was given.
#[tokio::test]
async fn keys_land_on_every_master() {
    let Some(urls) = redis_cluster_urls() else {
        return;
    };
    let store = RedisStore::connect_cluster([&urls[0]]).await.unwrap();
    let before: Vec<i64> = futures_dbsizes(&urls).await;
    for i in 0..60 {
        let key = fresh_key(&format!("spread-{i}"));
        assert!(matches!(
            store.claim(&key, Duration::from_secs(60)).await.unwrap(),
            ClaimOutcome::Claimed(_)
        ));
    }
    let after = futures_dbsizes(&urls).await;
    for (node, (b, a)) in before.iter().zip(&after).enumerate() {
        assert!(a > b, "master {node} got no key: {before:?} -> {after:?}");
    }
}

async fn futures_dbsizes(urls: &[String]) -> Vec<i64> {
    let mut sizes = Vec::new();
    for url in urls {
        sizes.push(dbsize(url).await);
    }
    sizes
}

/// A master restarts (its keys are gone: this cluster keeps nothing on disk): while it is
/// down, requests for its slots get 503 and the others work; once it is back, every request
/// works again, without restarting the application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_recovers_from_a_master_restart() {
    let Some(cluster) = RedisCluster::start() else {
        support::servers::unavailable("redis-server and redis-cli (for a Redis Cluster)");
        return;
    };
    let store = RedisStore::connect_cluster(cluster.urls()).await.unwrap();
    let (mut app, _probe) = app(IdempotencyLayer::with_settings(
        Settings::new(store).store_timeout(Duration::from_secs(2)),
    ));
    let statuses = |app: &mut support::App<RedisStore>, tag: &'static str| {
        let mut app = app.clone();
        async move {
            let mut statuses = Vec::new();
            for i in 0..30 {
                let key = format!("{tag}-{i}-{}", fresh_key("r").replace('/', "-"));
                statuses.push(
                    send(&mut app, request(Some(&key), "{}", &[]))
                        .await
                        .status
                        .as_u16(),
                );
            }
            statuses
        }
    };
    assert!(statuses(&mut app, "before").await.iter().all(|s| *s == 201));
    cluster.nodes[1].stop();
    let down = statuses(&mut app, "down").await;
    assert!(
        down.contains(&503),
        "the stopped master's slots fail closed: {down:?}"
    );
    assert!(
        down.contains(&201),
        "the other masters' slots still work: {down:?}"
    );
    cluster.nodes[1].restart();
    cluster.wait_until_ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let after = statuses(&mut app, "after").await;
        if after.iter().all(|s| *s == 201) {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {after:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = &mut app;
}

/// The demo on the cluster, given one seed node: every fresh key works (a client that is not
/// cluster-aware gets `MOVED` for two thirds of them), and retries replay.
#[tokio::test]
async fn the_demo_works_on_a_cluster_from_one_seed_node() {
    let Some(urls) = redis_cluster_urls() else {
        return;
    };
    let seed = urls[0].trim_start_matches("redis://");
    let demo = support::demo::Demo::start(&["--store", &format!("redis+cluster://{seed}")]).await;
    let payment = r#"{"amount": 1000, "currency": "usd"}"#;
    let mut keys = Vec::new();
    for i in 0..60 {
        let key = format!("cluster-demo-{i}-{}", fresh_key("d").replace('/', "-"));
        let reply = demo.post("acme", Some(&key), payment).await;
        assert_eq!(reply.status, 201, "key {i}");
        keys.push(key);
    }
    for key in &keys[..10] {
        assert!(demo.post("acme", Some(key), payment).await.replayed());
    }
    assert_eq!(demo.executions().await, 60);
}

/// `with_min_replicas` on a cluster: the `WAIT` runs on the master of the key's slot, after a
/// write of its own there. This cluster has no replicas, so a claim is refused (released, the
/// handler never runs) and a point's save is an error, for keys on every master and for a key
/// whose slot no tag of its own names (`}` and no tag).
#[tokio::test]
async fn with_required_replicas_a_cluster_without_replicas_refuses_claims_and_saves() {
    use tower_idempotency::store::RecoveryPoint;
    let Some(store) = store().await else { return };
    let strict = store
        .clone()
        .with_min_replicas(1, Duration::from_millis(100));
    let lease = Duration::from_secs(30);
    let mut keys: Vec<String> = (0..6)
        .map(|i| fresh_key(&format!("replicas-{i}")))
        .collect();
    keys.push(format!("{}}}", fresh_key("replicas-brace")));
    for key in &keys {
        let refused = strict.claim(key, lease).await;
        let error = format!(
            "{:?}",
            refused.expect_err("no replica acknowledges the claim")
        );
        assert!(error.contains("NotReplicated"), "{key}: {error}");
        // Released: the key is free again.
        let ClaimOutcome::Claimed(token) = store.claim(key, lease).await.unwrap() else {
            panic!("{key}: the refused claim was released")
        };
        let saved = strict
            .save_point(key, &token, &RecoveryPoint::new("charged", "ch"), lease)
            .await;
        let error = format!(
            "{:?}",
            saved.expect_err("no replica acknowledges the point")
        );
        assert!(error.contains("NotReplicated"), "{key}: {error}");
        // Written on the master all the same: the owner reads it back.
        assert!(
            store.load_point(key, &token).await.unwrap().is_some(),
            "{key}"
        );
        store.release(key, &token).await.unwrap();
    }
}
