//! Two demo processes pointed at one shared store behave as one service (Redis and PostgreSQL).

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::demo::Demo;
use support::servers::{self, PostgresServer, RedisServer};

const PAYMENT: &str = r#"{"amount": 1000, "currency": "usd"}"#;

fn key(name: &str) -> String {
    format!("{name}-{:x}", fastrand_u64())
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

async fn a_key_used_on_one_instance_replays_on_the_other(store: &str) {
    let (a, b) = (
        Demo::start(&["--store", store]).await,
        Demo::start(&["--store", store]).await,
    );
    let k = key("cross");
    let first = a.post("acme", Some(&k), PAYMENT).await;
    assert_eq!(first.status, 201);
    let retry = b.post("acme", Some(&k), PAYMENT).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(
        b.post("acme", Some(&k), r#"{"amount": 1}"#).await.status,
        422
    );
    assert_eq!(a.executions().await + b.executions().await, 1);
}

async fn concurrent_duplicates_over_two_instances_run_once(store: &str) {
    let demos = Arc::new([
        Demo::start(&["--store", store]).await,
        Demo::start(&["--store", store]).await,
    ]);
    let k = Arc::new(key("herd"));
    let barrier = Arc::new(tokio::sync::Barrier::new(40));
    let body = r#"{"amount": 7, "currency": "usd", "delay_ms": 300}"#;
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let (demos, k, barrier) = (demos.clone(), k.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                demos[i % 2]
                    .post("acme", Some(&k), body)
                    .await
                    .status
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 409),
        "{statuses:?}"
    );
    assert_eq!(
        demos[0].executions().await + demos[1].executions().await,
        1,
        "{statuses:?}"
    );
}

async fn a_record_survives_a_restart_of_the_demo(store: &str) {
    let k = key("restart");
    let mut first = Demo::start(&["--store", store]).await;
    let original = first.post("acme", Some(&k), PAYMENT).await;
    first.kill();
    let second = Demo::start(&["--store", store]).await;
    let retry = second.post("acme", Some(&k), PAYMENT).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, original.body);
    assert_eq!(second.executions().await, 0);
}

async fn a_killed_instance_blocks_its_key_only_until_the_lock_ttl(store: &str) {
    // Without recovery points: the retry below sends another payload (no simulated slowness),
    // which a key with a point would refuse (422).
    let args = ["--store", store, "--lock-ttl", "2", "--no-recovery-points"];
    let (mut a, b) = (Demo::start(&args).await, Demo::start(&args).await);
    let k = key("sigkill");
    let slow = r#"{"amount": 1, "currency": "usd", "delay_ms": 60000}"#;
    let base = a.base.clone();
    let pending = tokio::spawn({
        let (k, body) = (k.clone(), slow.to_owned());
        async move {
            // Fails once the process dies; that is the point.
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http();
            let request = http::Request::post(format!("{base}/payments"))
                .header("authorization", "Bearer acme")
                .header("idempotency-key", k)
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            let _ = client.request(request).await;
        }
    });
    while a.executions().await == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill();
    let killed_at = Instant::now();
    let _ = pending.await;
    assert_eq!(
        b.post("acme", Some(&k), slow).await.status,
        409,
        "the dead claim still holds its lease"
    );
    // The client retries (without the simulated slowness, to keep the test short).
    let reply = loop {
        let reply = b.post("acme", Some(&k), PAYMENT).await;
        if reply.status != 409 {
            break reply;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(15),
            "the key stayed blocked past the lock TTL"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The lease lapsed: the retry ran.
    assert_eq!(reply.status, 201);
    assert!(!reply.replayed());
    // The 2 s lease was renewed every 0.67 s, so at least 1.33 s of it was left at the kill.
    assert!(
        killed_at.elapsed() >= Duration::from_millis(1200),
        "blocked for about the lock TTL"
    );
}

/// A payment sent to `base` on a connection of its own; the task resolves to the reply's
/// status and body, or `None` when the connection was cut.
fn spawn_payment(
    base: &str,
    key: &str,
    body: &str,
) -> tokio::task::JoinHandle<Option<(u16, bytes::Bytes)>> {
    let request = http::Request::post(format!("{base}/payments"))
        .header("authorization", "Bearer acme")
        .header("idempotency-key", key)
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_owned(),
        )))
        .unwrap();
    tokio::spawn(async move {
        use http_body_util::BodyExt;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let response = client.request(request).await.ok()?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    })
}

/// A rolling deploy: instance A gets SIGTERM while one payment runs with its client waiting
/// and another runs detached (its client went away). The waiting client gets its 201, A exits
/// 0 within the drain timeout, and instance B replays both payments at once: one execution each.
async fn sigterm_drains_in_flight_and_detached_payments(store: &str) {
    let args = ["--store", store, "--drain-timeout", "10"];
    let (mut a, b) = (Demo::start(&args).await, Demo::start(&args).await);
    let (waited, detached) = (key("drain-waited"), key("drain-detached"));
    let slow = r#"{"amount": 1500, "currency": "usd", "delay_ms": 1500}"#;
    let answered = spawn_payment(&a.base, &waited, slow);
    let abandoned = spawn_payment(&a.base, &detached, slow);
    while a.executions().await < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    abandoned.abort();
    let _ = abandoned.await;
    a.signal("TERM");
    let signalled = Instant::now();
    let (status, original) = answered
        .await
        .unwrap()
        .expect("the in-flight client is answered, not cut off");
    assert_eq!(status, 201);
    let exit = a
        .exited_within(Duration::from_secs(12))
        .await
        .expect("A exits within the drain timeout");
    assert!(exit.success(), "A exits cleanly: {exit:?}");
    assert!(signalled.elapsed() < Duration::from_secs(11));
    let exited = Instant::now();
    let retry = b.post("acme", Some(&waited), slow).await;
    assert!(retry.replayed(), "the answered payment replays on B");
    assert_eq!(retry.body, original);
    let retry = b.post("acme", Some(&detached), slow).await;
    assert_eq!(retry.status, 201);
    assert!(
        retry.replayed(),
        "the detached payment finished and replays on B"
    );
    assert!(
        exited.elapsed() < Duration::from_secs(1),
        "at once, not after a lease"
    );
    assert_eq!(b.executions().await, 0, "one execution of each, both on A");
}

/// A drain whose deadline passes before the handler ends hands the key back: the retry on
/// instance B runs at once instead of answering 409 for the lease.
async fn a_drain_past_its_deadline_releases_the_key(store: &str) {
    // Without recovery points: the retry sends another payload (see above).
    let args = [
        "--store",
        store,
        "--drain-timeout",
        "1",
        "--no-recovery-points",
    ];
    let (mut a, b) = (Demo::start(&args).await, Demo::start(&args).await);
    let k = key("drain-deadline");
    let endless = r#"{"amount": 1, "currency": "usd", "delay_ms": 60000}"#;
    let cut = spawn_payment(&a.base, &k, endless);
    while a.executions().await == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.signal("TERM");
    let exit = a
        .exited_within(Duration::from_secs(5))
        .await
        .expect("A exits soon after its 1 s drain timeout");
    assert!(exit.success(), "{exit:?}");
    assert_eq!(cut.await.unwrap(), None, "that client's connection was cut");
    let retry = b.post("acme", Some(&k), PAYMENT).await;
    assert_eq!(retry.status, 201, "the released key runs at once, not 409");
    assert!(!retry.replayed());
}

/// The store goes down while a payment runs and comes back after it answered (a restart, a
/// failover): the client gets its 201, the outcome is stored once the store is back, and the
/// retry replays it. The payment never runs twice, not even after the lease.
async fn a_store_restart_at_completion_never_runs_a_payment_twice(
    store: &str,
    stop: impl FnOnce(),
    start: impl FnOnce(),
) {
    let demo = Demo::start(&["--store", store]).await;
    let k = key("blip");
    let body = r#"{"amount": 5, "currency": "usd", "delay_ms": 1200}"#;
    let started = Instant::now();
    let pending = spawn_payment(&demo.base, &k, body);
    while demo.executions().await == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop();
    tokio::time::sleep(Duration::from_millis(2000).saturating_sub(started.elapsed())).await;
    start();
    let (status, original) = pending.await.unwrap().expect("the client is answered");
    assert_eq!(status, 201);
    let deadline = Instant::now() + Duration::from_secs(30);
    let retry = loop {
        let reply = demo.post("acme", Some(&k), body).await;
        if reply.status != 409 && reply.status != 503 {
            break reply;
        }
        assert!(Instant::now() < deadline, "the outcome was never stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(retry.replayed(), "status {}", retry.status);
    assert_eq!(retry.body, original);
    assert_eq!(demo.executions().await, 1, "the payment ran once");
}

/// While the store is down keyed requests get 503 problem+json and keyless ones still work;
/// once it is back, keyed requests work again without restarting the demo.
async fn store_outage_fails_closed_then_recovers(
    store: &str,
    stop: impl FnOnce(),
    start: impl FnOnce(),
) {
    let demo = Demo::start(&["--store", store]).await;
    assert_eq!(
        demo.post("acme", Some(&key("before")), PAYMENT)
            .await
            .status,
        201
    );
    stop();
    let down = demo.post("acme", Some(&key("down")), PAYMENT).await;
    assert_eq!(down.status, 503);
    assert_eq!(down.headers["content-type"], "application/problem+json");
    assert!(down.headers.contains_key("retry-after"));
    assert_eq!(
        demo.post("acme", None, PAYMENT).await.status,
        201,
        "keyless requests do not need the store"
    );
    start();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = demo.post("acme", Some(&key("after")), PAYMENT).await;
        if reply.status == 201 {
            break;
        }
        assert_eq!(reply.status, 503);
        assert!(Instant::now() < deadline, "keyed requests did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

macro_rules! fleet_tests {
    ($module:ident, $url:path) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn a_key_used_on_one_instance_replays_on_the_other() {
                let Some(url) = $url() else { return };
                super::a_key_used_on_one_instance_replays_on_the_other(&url).await;
            }

            #[tokio::test]
            async fn concurrent_duplicates_over_two_instances_run_once() {
                let Some(url) = $url() else { return };
                super::concurrent_duplicates_over_two_instances_run_once(&url).await;
            }

            #[tokio::test]
            async fn a_record_survives_a_restart_of_the_demo() {
                let Some(url) = $url() else { return };
                super::a_record_survives_a_restart_of_the_demo(&url).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sigterm_drains_in_flight_and_detached_payments() {
                let Some(url) = $url() else { return };
                super::sigterm_drains_in_flight_and_detached_payments(&url).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_drain_past_its_deadline_releases_the_key() {
                let Some(url) = $url() else { return };
                super::a_drain_past_its_deadline_releases_the_key(&url).await;
            }

            #[tokio::test]
            async fn a_killed_instance_blocks_its_key_only_until_the_lock_ttl() {
                let Some(url) = $url() else { return };
                super::a_killed_instance_blocks_its_key_only_until_the_lock_ttl(&url).await;
            }
        }
    };
}

fleet_tests!(redis, servers::redis_url);
fleet_tests!(postgres, servers::postgres_url);

#[tokio::test]
async fn redis_outage_fails_closed_then_recovers() {
    let Some(server) = RedisServer::start() else {
        servers::unavailable("redis-server");
        return;
    };
    store_outage_fails_closed_then_recovers(&server.url(), || server.stop(), || server.restart())
        .await;
}

#[tokio::test]
async fn postgres_outage_fails_closed_then_recovers() {
    let Some(server) = PostgresServer::start() else {
        servers::unavailable("PostgreSQL");
        return;
    };
    store_outage_fails_closed_then_recovers(&server.url(), || server.stop(), || server.restart())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_at_completion_never_runs_a_payment_twice() {
    let Some(server) = RedisServer::start_persistent() else {
        servers::unavailable("redis-server");
        return;
    };
    a_store_restart_at_completion_never_runs_a_payment_twice(
        &server.url(),
        || server.stop(),
        || server.restart(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_at_completion_never_runs_a_payment_twice() {
    let Some(server) = PostgresServer::start() else {
        servers::unavailable("PostgreSQL");
        return;
    };
    a_store_restart_at_completion_never_runs_a_payment_twice(
        &server.url(),
        || server.stop(),
        || server.restart(),
    )
    .await;
}
