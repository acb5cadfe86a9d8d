//! The demo server, driven from outside over loopback as a client would: its contract and the
//! promises the README's walk-through makes.

use crate::support;

use std::sync::Arc;

use support::demo::Demo;

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
    // `fail` answers 500 after the charge, on the key's first run: the key is released, and
    // the retry (the same payload) runs, resuming from the run's recovery point.
    let flaky = r#"{"amount": 1, "currency": "usd", "fail": true}"#;
    let failed = demo.post("tenant-a", Some("flaky"), flaky).await;
    assert_eq!(failed.status, 500);
    let retried = demo.post("tenant-a", Some("flaky"), flaky).await;
    assert_eq!(retried.status, 201);
    assert!(!retried.replayed());
    assert_eq!(demo.executions().await, 4);
    assert_eq!(
        demo.stats().await["provider_charges"],
        3,
        "the retry charged nothing"
    );
    // Another payload under that key is refused: a charge was made under it for the first.
    let other = demo.post("tenant-a", Some("flaky"), PAYMENT).await;
    assert_eq!(other.status, 422);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retrying_client_example_executes_every_payment_once_despite_dropped_answers() {
    let demo = Demo::start(&["--drop-responses", "0.3"]).await;
    let binary = support::demo::example_binary("retrying_client");
    let output = tokio::process::Command::new(binary)
        .args(["--url", &demo.base, "--payments", "150"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("payments the client believes it made: 150"),
        "{stdout}"
    );
    assert!(
        stdout.contains("payments the server executed:         150"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("answers that were replays:            0\n"),
        "answers were dropped and replayed: {stdout}"
    );
    assert_eq!(demo.executions().await, 150);
}

/// Reading a payment needs its tenant: anonymous 401 (problem+json), the owner 200, another
/// tenant 404 (as if it did not exist), an unknown id 404.
#[tokio::test]
async fn reading_a_payment_needs_its_tenant() {
    let demo = Demo::start(&[]).await;
    let created = demo.post("acme", Some("read-anon"), PAYMENT).await;
    assert_eq!(created.status, 201);
    let location = created.headers["location"].to_str().unwrap().to_owned();
    let get = |path: &str, tenant: Option<&str>| {
        let mut request = http::Request::get(format!("{}{path}", demo.base));
        if let Some(tenant) = tenant {
            request = request.header("authorization", format!("Bearer {tenant}"));
        }
        request.body(http_body_util::Full::default()).unwrap()
    };
    let anonymous = demo.send(get(&location, None)).await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(
        anonymous.headers["content-type"],
        "application/problem+json"
    );
    assert_eq!(demo.send(get(&location, Some("acme"))).await.status, 200);
    assert_eq!(demo.send(get(&location, Some("globex"))).await.status, 404);
    let unknown = demo.send(get("/payments/pay_unknown", Some("acme"))).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.headers["content-type"], "application/problem+json");
}

/// A tenant reads its own payments; another tenant's payment does not exist for it.
#[tokio::test]
async fn a_tenant_cannot_read_another_tenants_payment() {
    let demo = Demo::start(&[]).await;
    let created = demo.post("acme", Some("read-1"), PAYMENT).await;
    assert_eq!(created.status, 201);
    let location = created.headers["location"].to_str().unwrap().to_owned();
    let get = |tenant: &'static str| {
        http::Request::get(format!("{}{location}", demo.base))
            .header("authorization", format!("Bearer {tenant}"))
            .body(http_body_util::Full::default())
            .unwrap()
    };
    let own = demo.send(get("acme")).await;
    assert_eq!(own.status, 200);
    assert_eq!(own.body, created.body);
    assert_eq!(demo.send(get("globex")).await.status, 404);
}

/// The demo remembers a bounded number of payments (the oldest go first): a load test cannot
/// grow it without bound.
#[tokio::test]
async fn the_demo_forgets_the_oldest_payments_past_its_bound() {
    let demo = Demo::start(&["--max-payments", "2"]).await;
    let mut locations = Vec::new();
    for i in 0..3 {
        let created = demo
            .post("acme", Some(&format!("bound-{i}")), PAYMENT)
            .await;
        assert_eq!(created.status, 201);
        locations.push(created.headers["location"].to_str().unwrap().to_owned());
    }
    let get = |location: &str| {
        http::Request::get(format!("{}{location}", demo.base))
            .header("authorization", "Bearer acme")
            .body(http_body_util::Full::default())
            .unwrap()
    };
    assert_eq!(
        demo.send(get(&locations[0])).await.status,
        404,
        "the oldest is gone"
    );
    assert_eq!(demo.send(get(&locations[1])).await.status, 200);
    assert_eq!(demo.send(get(&locations[2])).await.status, 200);
}

/// The answers the README's curl walk-through shows are the demo's: its steps run as written,
/// and each `#   HTTP/1.1 …` status, the problem's `type` and `title`, and the `/stats`
/// document of step 6 are compared with what the demo answers.
#[tokio::test]
async fn the_readmes_walkthrough_shows_the_demos_answers() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let walkthrough = &readme[readme.find("# 1. First request").expect("the walk-through")..];
    let walkthrough = &walkthrough[..walkthrough.find("```").unwrap()];
    let statuses: Vec<u16> = walkthrough
        .lines()
        .filter_map(|line| line.strip_prefix("#   HTTP/1.1 "))
        .map(|status| status[..3].parse().unwrap())
        .collect();
    let problem: serde_json::Value = walkthrough
        .lines()
        .find_map(|line| line.strip_prefix("#   {\"type\""))
        .map(|rest| {
            // `"…#key-reused"`: the README elides the URI's base and the detail.
            let (uri, rest) = rest.trim_start_matches(':').split_once(',').unwrap();
            let title = rest.split("\"title\":\"").nth(1).unwrap().split('"').next().unwrap();
            serde_json::json!({ "type": uri.trim_matches('"').trim_start_matches('…'), "title": title })
        })
        .expect("step 3's problem document");
    let stats: serde_json::Value = walkthrough
        .lines()
        .find(|line| line.contains("localhost:3000/stats"))
        .and_then(|line| line.split("# ").nth(1))
        .map(|json| serde_json::from_str(json.trim()).unwrap())
        .expect("step 6's answer");

    let demo = Arc::new(Demo::start(&[]).await);
    let mut answered = Vec::new();
    demo.post("acme", Some("order-42"), PAYMENT).await;
    let retry = demo.post("acme", Some("order-42"), PAYMENT).await;
    assert!(retry.replayed());
    answered.push(retry.status.as_u16());
    let reused = demo
        .post(
            "acme",
            Some("order-42"),
            r#"{"amount": 9999, "currency": "usd"}"#,
        )
        .await;
    answered.push(reused.status.as_u16());
    let document: serde_json::Value = serde_json::from_slice(&reused.body).unwrap();
    assert!(
        document["type"]
            .as_str()
            .unwrap()
            .ends_with(problem["type"].as_str().unwrap()),
        "{document}"
    );
    assert_eq!(document["title"], problem["title"]);
    let slow = r#"{"amount": 1, "currency": "usd", "delay_ms": 5000}"#;
    let original = tokio::spawn({
        let demo = demo.clone();
        async move { demo.post("acme", Some("slow-1"), slow).await }
    });
    while demo.executions().await < 2 {
        tokio::task::yield_now().await;
    }
    answered.push(
        demo.post("acme", Some("slow-1"), slow)
            .await
            .status
            .as_u16(),
    );
    assert_eq!(answered, statuses, "the README's statuses, steps 2 to 4");
    assert_eq!(original.await.unwrap().status, 201);
    assert_eq!(demo.stats().await, stats, "step 6");
}

/// With `--drop-responses` (fault injection) the demo still shuts down as it does without it:
/// on SIGTERM it stops accepting, lets the running payment answer, drains and exits 0. (The
/// fraction is tiny, so that no answer here is dropped.) It also takes the lease as `--lease`.
#[tokio::test]
async fn the_dropping_demo_drains_on_sigterm() {
    let args = [
        "--drop-responses",
        "0.000000001",
        "--drain-timeout",
        "10",
        "--lease",
        "5",
    ];
    let mut demo = Demo::start(&args).await;
    let slow = r#"{"amount": 1, "currency": "usd", "delay_ms": 1500}"#;
    let running = {
        let request = hyper::Request::post(format!("{}/payments", demo.base))
            .header("authorization", "Bearer acme")
            .header("idempotency-key", "drain-dropping")
            .body(http_body_util::Full::new(bytes::Bytes::from(slow)))
            .unwrap();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        tokio::spawn(async move { client.request(request).await.map(|r| r.status()) })
    };
    while demo.executions().await < 1 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    demo.signal("TERM");
    let status = running
        .await
        .unwrap()
        .expect("the running payment is answered, not cut off");
    assert_eq!(status, 201);
    let exit = demo
        .exited_within(std::time::Duration::from_secs(12))
        .await
        .expect("the demo exits within its drain timeout");
    assert!(exit.success(), "{exit:?}");
}
