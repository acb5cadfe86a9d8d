//! Sends payments through the retrying client layer to the demo server and checks that every
//! logical payment ran exactly once, despite answers lost on the way back.
//!
//! ```text
//! cargo run --example demo_server -- --drop-responses 0.3 &
//! cargo run --example retrying_client -- --url http://127.0.0.1:3000 --payments 200
//! ```
//!
//! The client stamps each payment with its own idempotency key and retries lost answers with
//! the same key; the server replays the stored outcome instead of charging again. At the end
//! it prints how many payments the client believes it made, how many the server executed
//! (`GET /stats`), and how many answers were replays.

use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::client::IdempotentRetryLayer;

#[derive(Parser, Debug)]
struct Args {
    /// The demo server.
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    url: String,
    /// How many payments to send.
    #[arg(long, default_value_t = 100)]
    payments: u32,
    /// How many payments are in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
}

/// Waits up to 30 s for the demo to answer `GET /stats` (it may still be compiling or
/// starting): its executions so far, or `None`.
async fn wait_for_server(url: &str) -> Option<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let request = Request::get(format!("{url}/stats"))
            .body(Full::default())
            .ok()?;
        if client.request(request).await.is_ok() {
            return Some(executions(url).await);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn executions(url: &str) -> u64 {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::get(format!("{url}/stats"))
        .body(Full::default())
        .unwrap();
    let body = client
        .request(request)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    serde_json::from_slice::<serde_json::Value>(&body).unwrap()["executions"]
        .as_u64()
        .unwrap()
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let before = match wait_for_server(&args.url).await {
        Some(executions) => executions,
        None => {
            eprintln!(
                "retrying_client: no demo server answers at {} after 30 s; start it first \
                 (cargo run --example demo_server) or pass --url",
                args.url
            );
            std::process::exit(1);
        }
    };

    // hyper's client, behind the retry layer: a key per payment, retries with the same key.
    let http = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build_http::<Full<Bytes>>();
    let client = ServiceBuilder::new()
        .layer(
            IdempotentRetryLayer::new()
                .max_attempts(12)
                .base_delay(Duration::from_millis(20)),
        )
        .service(http);

    let (mut made, mut failed, mut replays) = (0u32, 0u32, 0u32);
    let mut tasks: tokio::task::JoinSet<(bool, bool)> = tokio::task::JoinSet::new();
    for n in 0..args.payments {
        if tasks.len() >= args.concurrency {
            let (ok, replayed) = tasks.join_next().await.unwrap().unwrap();
            (made, failed, replays) = (
                made + ok as u32,
                failed + !ok as u32,
                replays + replayed as u32,
            );
        }
        let (client, url) = (client.clone(), args.url.clone());
        tasks.spawn(async move {
            let request = Request::post(format!("{url}/payments"))
                .header("authorization", "Bearer retrying-client")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(format!(
                    r#"{{"amount": {}, "currency": "usd"}}"#,
                    100 + n
                ))))
                .unwrap();
            match client.oneshot(request).await {
                Ok(response) => {
                    let replayed = response
                        .headers()
                        .get("idempotent-replayed")
                        .is_some_and(|v| v == "true");
                    (response.status() == StatusCode::CREATED, replayed)
                }
                Err(error) => {
                    eprintln!("payment {n} failed after all retries: {error}");
                    (false, false)
                }
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        let (ok, replayed) = result.unwrap();
        (made, failed, replays) = (
            made + ok as u32,
            failed + !ok as u32,
            replays + replayed as u32,
        );
    }
    let executed = executions(&args.url).await - before;

    println!("payments the client believes it made: {made}");
    println!("payments the server executed:         {executed}");
    println!("answers that were replays:            {replays}");
    println!("payments that failed for good:        {failed}");
    if u64::from(made) == executed && failed == 0 {
        println!("OK: every payment executed exactly once");
    } else {
        println!("MISMATCH");
        std::process::exit(1);
    }
}
