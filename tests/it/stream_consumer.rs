//! The Redis Streams example against a real Redis server: two consumers in a group, one killed
//! mid-batch before acking, its pending messages claimed by the other, and every message's side
//! effect applied exactly once.

use crate::support;

use std::collections::HashMap;

use redis::AsyncCommands;
use support::demo::example_binary;
use support::servers;

async fn run(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(example_binary("stream_consumer"))
        .args(args)
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_crashed_consumers_messages_are_redelivered_and_applied_exactly_once() {
    let Some(url) = servers::redis_url() else {
        return;
    };
    let stream = format!("payments-{}", std::process::id());
    let common = ["--redis", &url, "--stream", &stream, "--group", "billing"];

    let produced = run(&[&common[..], &["--produce", "100"]].concat()).await;
    assert!(produced.status.success());

    // Consumer a handles 25 messages (two acked batches of 10, then 5 of the third) and dies
    // before acking the third batch.
    let a = run(&[&common[..], &["--consumer", "a", "--crash-after", "25"]].concat()).await;
    assert!(!a.status.success(), "consumer a must have crashed");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let pending: redis::streams::StreamPendingReply =
        redis.xpending(&stream, "billing").await.unwrap();
    assert_eq!(pending.count(), 10, "a's third batch is left pending");

    // Consumer b claims a's pending messages and drains the stream.
    let b = run(&[
        &common[..],
        &["--consumer", "b", "--min-idle-ms", "0", "--exit-when-idle"],
    ]
    .concat())
    .await;
    let stdout = String::from_utf8_lossy(&b.stdout);
    assert!(
        b.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&b.stderr)
    );
    assert!(
        stdout.contains("b: processed 75 duplicates 5 in_progress 0 failed 0"),
        "the 5 messages a handled but did not ack are duplicates for b: {stdout}"
    );

    let effects: HashMap<String, u64> = redis.hgetall(format!("{stream}:effects")).await.unwrap();
    assert_eq!(effects.len(), 100, "every message's effect was applied");
    assert!(
        effects.values().all(|&count| count == 1),
        "exactly once each: {effects:?}"
    );
    let pending: redis::streams::StreamPendingReply =
        redis.xpending(&stream, "billing").await.unwrap();
    assert_eq!(pending.count(), 0, "everything acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_running_together_apply_each_effect_once_when_one_dies() {
    let Some(url) = servers::redis_url() else {
        return;
    };
    let stream = format!("payments-together-{}", std::process::id());
    let common = [
        "--redis",
        &url,
        "--stream",
        &stream,
        "--group",
        "billing",
        "--delay-ms",
        "3",
    ];
    assert!(run(&[&common[..], &["--produce", "200"]].concat())
        .await
        .status
        .success());

    let a_args = [
        &common[..],
        &["--consumer", "a", "--crash-after", "15", "--exit-when-idle"],
    ]
    .concat();
    let b_args = [
        &common[..],
        &[
            "--consumer",
            "b",
            "--min-idle-ms",
            "300",
            "--exit-when-idle",
        ],
    ]
    .concat();
    let (a, b) = tokio::join!(run(&a_args), run(&b_args));
    let b_out = String::from_utf8_lossy(&b.stdout);
    assert!(
        b.status.success(),
        "{b_out}{}",
        String::from_utf8_lossy(&b.stderr)
    );
    let a_crashed = !a.status.success();
    eprintln!("a crashed: {a_crashed}; {b_out}");

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let effects: HashMap<String, u64> = redis.hgetall(format!("{stream}:effects")).await.unwrap();
    assert_eq!(
        effects.len(),
        200,
        "every message's effect was applied (a crashed: {a_crashed})"
    );
    assert!(
        effects.values().all(|&count| count == 1),
        "exactly once each: {effects:?}"
    );
    let pending: redis::streams::StreamPendingReply =
        redis.xpending(&stream, "billing").await.unwrap();
    assert_eq!(pending.count(), 0, "everything acked");
}
