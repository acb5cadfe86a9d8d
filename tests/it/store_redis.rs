//! `RedisStore` against a real Redis server: the conformance suite and the fleet cases.

use crate::support;

use support::servers::redis_url;
use support::shared_store;
use tower_idempotency::store::RedisStore;
use tower_idempotency::Settings;

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
    let mut raw = support::servers::raw_redis(&url).await;
    let exists: bool = redis::cmd("EXISTS")
        .arg("tenant-a:k")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(exists, "records live under the prefix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_goes_away_and_comes_back() {
    let Some(server) = support::servers::own_redis("stop") else {
        return;
    };
    let store = RedisStore::connect(&server.url()).await.unwrap();
    shared_store::outage_then_recovery(&store, || server.stop(), || server.restart()).await;
}

/// Redis stalls (a `SIGSTOP`ped server, as a long fork, a swap storm or a VM pause looks)
/// longer than the store timeout: the request gets 503, the queued claim is written when Redis
/// resumes, and the layer releases it, so the key does not answer 409 for a whole lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_timed_out_and_landed_late_does_not_lock_the_key() {
    use std::time::Duration;
    use support::{app, request, send};
    use tower_idempotency::IdempotencyLayer;
    let Some(server) = support::servers::own_redis("pause") else {
        return;
    };
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let layer = IdempotencyLayer::with_settings(
        Settings::new(store)
            .store_timeout(Duration::from_millis(500))
            .lease(Duration::from_secs(60)),
    );
    let (mut app, probe) = app(layer);
    // Warm: the scripts are loaded (a first call on a paused server would fail NOSCRIPT).
    assert_eq!(
        send(&mut app, request(Some("warm"), "{}", &[]))
            .await
            .status,
        201
    );
    server.pause();
    let resume = tokio::spawn({
        let pid = server.pid();
        async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            support::servers::signal(pid, "CONT");
        }
    });
    send(&mut app, request(Some("paused"), "{}", &[]))
        .await
        .assert_problem(503, "store-unavailable");
    resume.await.unwrap();
    // Redis resumed and wrote the queued claim; the layer hands it back.
    let started = std::time::Instant::now();
    let answer = loop {
        let answer = send(&mut app, request(Some("paused"), "{}", &[])).await;
        if answer.status != 409 && answer.status != 503 {
            break answer;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the key stayed locked ({})",
            answer.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answer.status, 201);
    assert_eq!(probe.executions(), 2);
}

/// A Redis that may evict keys is reported at start, and refused in strict mode; the
/// recommended configuration passes.
#[tokio::test]
async fn an_evicting_policy_is_reported_and_refused_in_strict_mode() {
    let Some(server) = support::servers::own_redis("reconfigure") else {
        return;
    };
    let mut admin = support::servers::raw_redis(&server.url()).await;
    let set = |policy: &'static str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg("maxmemory-policy").arg(policy);
        cmd
    };
    for policy in ["allkeys-lru", "volatile-lru", "volatile-ttl"] {
        let _: () = set(policy).query_async(&mut admin).await.unwrap();
        let store = RedisStore::connect(&server.url()).await.unwrap();
        let config = store.check_config().await.unwrap();
        assert!(config.can_evict(), "{policy}");
        assert_eq!(config.maxmemory_policy, policy);
        let refused = RedisStore::connect_strict(&server.url()).await;
        let error = refused.expect_err("strict mode refuses an evicting policy");
        assert!(
            std::error::Error::source(&error)
                .unwrap()
                .to_string()
                .contains("noeviction"),
            "{error:?}"
        );
    }
    let _: () = set("noeviction").query_async(&mut admin).await.unwrap();
    let store = RedisStore::connect_strict(&server.url()).await.unwrap();
    let config = store.check_config().await.unwrap();
    assert!(!config.can_evict());
    assert!(!config.appendonly, "the test server keeps nothing on disk");
}

/// A service can start before its Redis: requests get 503 until it answers, then work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_store_starts_before_redis_and_works_once_it_is_up() {
    let Some(server) = support::servers::own_redis("stop") else {
        return;
    };
    server.stop();
    assert!(
        RedisStore::connect(&server.url()).await.is_err(),
        "eager connect fails"
    );
    let store =
        RedisStore::connect_lazy(&server.url()).expect("lazy connect never needs the server");
    shared_store::a_lazy_store_works_once_its_server_is_up(store, || server.restart()).await;
}

/// A server that forgot its scripts (restarted, failed over, `SCRIPT FLUSH`) is sent the
/// script again by the first owner-checked call that needs it, which then succeeds.
#[tokio::test]
async fn owner_checked_calls_reload_the_scripts_a_server_forgot() {
    use std::time::Duration;
    use tower_idempotency::store::conformance::fresh_key;
    use tower_idempotency::store::{ClaimOutcome, Record, Store};
    let Some(store) = store().await else { return };
    let mut raw = support::servers::raw_redis(&redis_url().unwrap()).await;
    let forget = || {
        let mut flush = redis::cmd("SCRIPT");
        flush.arg("FLUSH");
        flush
    };
    let lease = Duration::from_secs(30);
    let (done, released) = (fresh_key("noscript-done"), fresh_key("noscript-released"));
    let ClaimOutcome::Claimed(token) = store.claim(&done, lease).await.unwrap() else {
        panic!("a fresh key is claimed")
    };
    let () = forget().query_async(&mut raw).await.unwrap();
    store.renew(&done, &token, lease).await.unwrap();
    let () = forget().query_async(&mut raw).await.unwrap();
    store
        .complete(&done, &token, Record::new(Some(3), "kept"), lease)
        .await
        .unwrap();
    match store.claim(&done, lease).await.unwrap() {
        ClaimOutcome::Completed(record) => assert_eq!(&record.payload()[..], b"kept"),
        other => panic!("the completion was stored: {other:?}"),
    }
    let ClaimOutcome::Claimed(token) = store.claim(&released, lease).await.unwrap() else {
        panic!("a fresh key is claimed")
    };
    let () = forget().query_async(&mut raw).await.unwrap();
    store.release(&released, &token).await.unwrap();
    assert!(matches!(
        store.claim(&released, lease).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
}

/// Issue 42, case 1: another tenant's key never reaches a recovery point, neither by sharing
/// its hash tag (`order-{T}` and `x-{T}`) nor by naming the victim's whole record key as its
/// tag. The attacker's run finds no point, and its completion leaves the victim's point alone.
#[tokio::test]
async fn another_tenants_key_never_reaches_a_recovery_point() {
    use std::time::Duration;
    use tower_idempotency::store::{ClaimOutcome, Record, RecoveryPoint, Store};
    let Some(store) = store().await else { return };
    let lease = Duration::from_secs(30);
    let ttl = Duration::from_secs(60);
    let nonce = format!("{:016x}", fastrand::u64(..));
    let acme_tagged = format!("4:acme|4:POST|9:/payments|order-{{{nonce}}}");
    let acme_plain = format!("4:acme|4:POST|9:/payments|order-{nonce}");
    for (victim, attacker) in [
        (
            acme_tagged.clone(),
            format!("7:mallory|4:POST|9:/payments|x-{{{nonce}}}"),
        ),
        (
            acme_plain.clone(),
            format!("7:mallory|4:POST|9:/payments|{{idempotency:{acme_plain}}}"),
        ),
    ] {
        let ClaimOutcome::Claimed(charged) = store.claim(&victim, lease).await.unwrap() else {
            panic!("a fresh key")
        };
        store
            .save_point(
                &victim,
                &charged,
                &RecoveryPoint::new("charged", "ch_acme"),
                ttl,
            )
            .await
            .unwrap();
        let ClaimOutcome::Claimed(mallory) = store.claim(&attacker, lease).await.unwrap() else {
            panic!("the attacker's key is its own")
        };
        assert_eq!(
            store.load_point(&attacker, &mallory).await.unwrap(),
            None,
            "{attacker:?} reads {victim:?}'s point"
        );
        store
            .complete(&attacker, &mallory, Record::new(None, "mallory"), ttl)
            .await
            .unwrap();
        // The victim's process died: its lease is released, and its retry resumes.
        store.release(&victim, &charged).await.unwrap();
        let ClaimOutcome::Claimed(retry) = store.claim(&victim, lease).await.unwrap() else {
            panic!("released")
        };
        let point = store.load_point(&victim, &retry).await.unwrap();
        assert_eq!(
            point.as_ref().map(|p| &p.data()[..]),
            Some(&b"ch_acme"[..]),
            "{victim:?}'s point after {attacker:?} completed"
        );
        store.release(&victim, &retry).await.unwrap();
    }
}
