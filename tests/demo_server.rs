//! The demo server, driven from outside over loopback as a client would: its contract and the
//! promises the README's walk-through makes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A demo process, killed on drop.
struct Demo {
    child: Child,
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn demo_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let binary = profile_dir.join("examples").join("demo_server");
    if !binary.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--example", "demo_server"])
            .status()
            .unwrap();
        assert!(status.success());
    }
    binary
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }
}

impl Demo {
    async fn start(args: &[&str]) -> Self {
        let mut child = Command::new(demo_binary())
            .args(["--addr", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = tokio::process::ChildStdout::from_std(child.stdout.take().unwrap()).unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).await.unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .expect(&line)
            .to_owned();
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self {
            child,
            base,
            client,
        }
    }

    async fn post(&self, tenant: &str, key: Option<&str>, body: &str) -> Reply {
        let mut request = Request::post(format!("{}/payments", self.base))
            .header("authorization", format!("Bearer {tenant}"))
            .header("content-type", "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        self.send(
            request
                .body(Full::new(Bytes::from(body.to_owned())))
                .unwrap(),
        )
        .await
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Reply {
        let response = self.client.request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    async fn executions(&self) -> u64 {
        let reply = self
            .send(
                Request::get(format!("{}/stats", self.base))
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        let stats: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        stats["executions"].as_u64().unwrap()
    }
}

const PAYMENT: &str = r#"{"amount": 1000, "currency": "usd"}"#;

#[tokio::test]
async fn the_walkthrough_holds_replay_422_409() {
    let demo = Demo::start(&[]).await;
    let first = demo.post("acme", Some("order-42"), PAYMENT).await;
    assert_eq!(first.status, 201);
    let retry = demo.post("acme", Some("order-42"), PAYMENT).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(
        retry.headers["original-x-request-id"],
        first.headers["x-request-id"]
    );
    assert_ne!(retry.headers["x-request-id"], first.headers["x-request-id"]);
    let other = demo
        .post(
            "acme",
            Some("order-42"),
            r#"{"amount": 9999, "currency": "usd"}"#,
        )
        .await;
    assert_eq!(other.status, 422);
    assert_eq!(other.headers["content-type"], "application/problem+json");

    let slow = r#"{"amount": 1, "currency": "usd", "delay_ms": 1500}"#;
    let demo = Arc::new(demo);
    let original = tokio::spawn({
        let demo = demo.clone();
        async move { demo.post("acme", Some("slow-1"), slow).await }
    });
    // Wait until the original's handler has started.
    while demo.executions().await < 2 {
        tokio::task::yield_now().await;
    }
    let conflict = demo.post("acme", Some("slow-1"), slow).await;
    assert_eq!(conflict.status, 409);
    assert_eq!(conflict.headers["retry-after"], "1");
    assert_eq!(original.await.unwrap().status, 201);
    assert_eq!(demo.executions().await, 2);
}

#[tokio::test]
async fn tenants_have_separate_key_spaces_and_failures_release_the_key() {
    let demo = Demo::start(&[]).await;
    let a = demo.post("tenant-a", Some("same-key"), PAYMENT).await;
    let b = demo.post("tenant-b", Some("same-key"), PAYMENT).await;
    assert!(!b.replayed());
    assert_ne!(a.body, b.body);
    let failed = demo
        .post(
            "tenant-a",
            Some("flaky"),
            r#"{"amount": 1, "currency": "usd", "fail": true}"#,
        )
        .await;
    assert_eq!(failed.status, 500);
    let corrected = demo.post("tenant-a", Some("flaky"), PAYMENT).await;
    assert_eq!(corrected.status, 201);
    assert!(!corrected.replayed());
    assert_eq!(demo.executions().await, 4);
}

#[tokio::test]
async fn concurrent_duplicates_over_http_run_the_handler_once_with_wait() {
    let demo = Arc::new(Demo::start(&["--on-conflict", "wait"]).await);
    let body = r#"{"amount": 5, "currency": "eur", "delay_ms": 200}"#;
    let barrier = Arc::new(tokio::sync::Barrier::new(32));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (demo, barrier) = (demo.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                demo.post("acme", Some("herd"), body).await
            })
        })
        .collect();
    let mut bodies = Vec::new();
    for task in tasks {
        let reply = task.await.unwrap();
        assert_eq!(reply.status, 201);
        bodies.push(reply.body);
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "every duplicate got the one payment"
    );
    assert_eq!(demo.executions().await, 1);
}

#[tokio::test]
async fn require_key_refuses_keyless_posts() {
    let demo = Demo::start(&["--require-key"]).await;
    let reply = demo.post("acme", None, PAYMENT).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.headers["content-type"], "application/problem+json");
    assert_eq!(demo.executions().await, 0);
}
