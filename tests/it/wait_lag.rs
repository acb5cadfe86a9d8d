//! How far a waiting duplicate on one instance lags behind the original on another, over two
//! demo processes on one store (`--on-conflict wait`). A measurement for `BENCHMARKS.md`, not a
//! pass/fail test (the machines are shared and noisy), hence ignored by default:
//!
//! ```text
//! cargo test --release --test wait_lag -- --ignored --nocapture
//! ```

use crate::support;

use std::time::{Duration, Instant};

use support::demo::Demo;
use support::servers;

const ROUNDS: usize = 40;

async fn lags(store: &str) -> Vec<Duration> {
    let args = ["--store", store, "--on-conflict", "wait"];
    let (a, b) = (Demo::start(&args).await, Demo::start(&args).await);
    // Warm both instances (connections, the subscriber).
    for demo in [&a, &b] {
        let key = format!("warm-{}", fastrand_u64());
        demo.post("acme", Some(&key), r#"{"amount": 1, "currency": "usd"}"#)
            .await;
    }
    let body = r#"{"amount": 1, "currency": "usd", "delay_ms": 400}"#;
    let mut lags = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let key = format!("lag-{round}-{}", fastrand_u64());
        let original = {
            let base = a.base.clone();
            let key = key.clone();
            tokio::spawn(async move {
                post(&base, &key, body).await;
                Instant::now()
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let duplicate = b.post("acme", Some(&key), body).await;
        let replayed_at = Instant::now();
        assert!(duplicate.replayed(), "status {}", duplicate.status);
        let answered_at = original.await.unwrap();
        lags.push(replayed_at.saturating_duration_since(answered_at));
    }
    lags.sort();
    lags
}

/// One payment on its own connection (the original, concurrent with the duplicate).
async fn post(base: &str, key: &str, body: &'static str) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let request = http::Request::post(format!("{base}/payments"))
        .header("authorization", "Bearer acme")
        .header("idempotency-key", key)
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            body.as_bytes(),
        )))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 201);
    use http_body_util::BodyExt;
    response.into_body().collect().await.unwrap();
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

fn summary(name: &str, lags: &[Duration]) -> String {
    let at = |q: f64| lags[((lags.len() - 1) as f64 * q).round() as usize];
    format!(
        "| {name} | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
        lags.len(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.9).as_secs_f64() * 1e3,
        lags.last().unwrap().as_secs_f64() * 1e3
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: cargo test --release --test wait_lag -- --ignored --nocapture"]
async fn waiting_duplicates_across_two_instances() {
    let mut rows = vec![
        "| store | rounds | median lag | p90 | max |".to_owned(),
        "|---|---:|---:|---:|---:|".to_owned(),
    ];
    if let Some(url) = servers::redis_url() {
        rows.push(summary("Redis", &lags(&url).await));
    }
    if let Some(url) = servers::postgres_url() {
        rows.push(summary("PostgreSQL", &lags(&url).await));
    }
    rows.push(summary("memory (one instance, both requests)", &{
        let demo = Demo::start(&["--on-conflict", "wait"]).await;
        let body = r#"{"amount": 1, "currency": "usd", "delay_ms": 400}"#;
        let mut lags = Vec::new();
        for round in 0..ROUNDS {
            let key = format!("mem-{round}-{}", fastrand_u64());
            let base = demo.base.clone();
            let original = tokio::spawn({
                let key = key.clone();
                async move {
                    post(&base, &key, body).await;
                    Instant::now()
                }
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(demo.post("acme", Some(&key), body).await.replayed());
            let replayed_at = Instant::now();
            lags.push(replayed_at.saturating_duration_since(original.await.unwrap()));
        }
        lags.sort();
        lags
    }));
    println!("{}", rows.join("\n"));
}
