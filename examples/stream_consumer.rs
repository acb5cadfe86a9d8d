//! An idempotent consumer group on a Redis Stream: the handler runs once per message even when
//! a consumer dies before acking and its messages are redelivered to another.
//!
//! ```text
//! # put 100 payment events on the stream
//! cargo run --example stream_consumer -- --redis redis://127.0.0.1:6379 --produce 100
//! # consumer a crashes after handling 25 messages, in the middle of a batch, before acking it
//! cargo run --example stream_consumer -- --redis redis://127.0.0.1:6379 --consumer a --crash-after 25
//! # consumer b claims a's pending messages (XAUTOCLAIM) and drains the stream
//! cargo run --example stream_consumer -- --redis redis://127.0.0.1:6379 --consumer b --exit-when-idle
//! ```
//!
//! Each message's side effect is `HINCRBY <stream>:effects <message id> 1`; after the run every
//! message id counts exactly 1. Consumer b reports the redelivered messages that a had already
//! handled as duplicates: their handler did not run again.
//!
//! The loop: `XAUTOCLAIM` messages left pending by dead consumers (idle longer than
//! `--min-idle-ms`), then `XREADGROUP` new ones, in batches; each message goes through the
//! idempotency layer (key: the stream entry id, scope: the stream); the batch is acked with
//! `XACK` after it was handled, except messages another consumer is still processing
//! (`Delivery::InProgress`) or whose handling failed: those stay pending and come back.

use std::time::Duration;

use clap::Parser;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimOptions, StreamId, StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tower::{service_fn, BoxError, Service};
use tower_idempotency::consumer::{ConsumerError, Delivery, IdempotentConsumerLayer, Identity};
use tower_idempotency::store::RedisStore;
use tower_idempotency::Settings;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// The Redis server (stream, group, side effects and idempotency records).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    #[arg(long, default_value = "payments")]
    stream: String,
    #[arg(long, default_value = "billing")]
    group: String,
    /// This consumer's name in the group.
    #[arg(long, default_value = "consumer-1")]
    consumer: String,
    /// Add this many payment events to the stream, then exit.
    #[arg(long)]
    produce: Option<u32>,
    /// Messages read per batch.
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// Simulate a crash: abort the process after handling this many messages, before acking
    /// the batch they belong to.
    #[arg(long)]
    crash_after: Option<u64>,
    /// Claim messages left pending by other consumers after this long.
    #[arg(long, default_value_t = 1000)]
    min_idle_ms: u64,
    /// The idempotency claim's lease, in seconds.
    #[arg(long, default_value_t = 30)]
    lease_secs: u64,
    /// Exit once the stream is drained and nothing is pending.
    #[arg(long)]
    exit_when_idle: bool,
    /// Simulated work per message, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

/// A payment event as it sits on the stream.
#[derive(Debug, Clone)]
struct PaymentEvent {
    stream: String,
    id: String,
    amount: u64,
}

/// What handling an event produced: stored, and replayed to redeliveries.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Charged {
    event: String,
    amount: u64,
}

#[derive(Default, Debug)]
struct Tally {
    processed: u64,
    duplicates: u64,
    in_progress: u64,
    failed: u64,
}

fn effects_key(stream: &str) -> String {
    format!("{stream}:effects")
}

async fn produce(redis: &mut ConnectionManager, args: &Args, count: u32) -> redis::RedisResult<()> {
    for n in 0..count {
        let _: String = redis
            .xadd(&args.stream, "*", &[("amount", (1000 + n).to_string())])
            .await?;
    }
    println!("produced {count} events on {}", args.stream);
    Ok(())
}

fn to_event(stream: &str, entry: &StreamId) -> PaymentEvent {
    PaymentEvent {
        stream: stream.to_owned(),
        id: entry.id.clone(),
        amount: entry.get::<u64>("amount").unwrap_or(0),
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let client = redis::Client::open(args.redis.as_str())?;
    let mut redis = ConnectionManager::new(client).await.map_err(|error| {
        format!(
            "this example needs a Redis server: none answers at {} ({error}); start one \
             (redis-server) or pass --redis redis://HOST:PORT",
            args.redis
        )
    })?;
    if let Some(count) = args.produce {
        produce(&mut redis, &args, count).await?;
        return Ok(());
    }
    let created: redis::RedisResult<()> = redis
        .xgroup_create_mkstream(&args.stream, &args.group, "0")
        .await;
    if let Err(error) = created {
        if error.code() != Some("BUSYGROUP") {
            return Err(error.into());
        }
    }

    // The handler: applies the side effect once per call. The layer makes that once per message.
    let effects = redis.clone();
    let delay = Duration::from_millis(args.delay_ms);
    let handler = service_fn(move |event: PaymentEvent| {
        let mut effects = effects.clone();
        async move {
            tokio::time::sleep(delay).await;
            let _: i64 = effects
                .hincr(effects_key(&event.stream), &event.id, 1)
                .await?;
            Ok::<_, BoxError>(Charged {
                event: event.id,
                amount: event.amount,
            })
        }
    });
    let store = RedisStore::new(redis.clone());
    let layer = IdempotentConsumerLayer::with_settings(
        |event: &PaymentEvent| {
            Identity::new(event.id.clone())
                .scope(event.stream.clone())
                .fingerprint(&event.amount.to_le_bytes())
        },
        Settings::new(store).lease(Duration::from_secs(args.lease_secs)),
    );
    let mut consumer = tower::Layer::layer(&layer, handler);

    let mut tally = Tally::default();
    let mut handled = 0u64;
    loop {
        // Messages a dead consumer left pending, then new ones.
        let claimed: redis::streams::StreamAutoClaimReply = redis
            .xautoclaim_options(
                &args.stream,
                &args.group,
                &args.consumer,
                args.min_idle_ms,
                "0-0",
                StreamAutoClaimOptions::default().count(args.batch),
            )
            .await?;
        let mut batch: Vec<PaymentEvent> = claimed
            .claimed
            .iter()
            .map(|e| to_event(&args.stream, e))
            .collect();
        if batch.is_empty() {
            let options = StreamReadOptions::default()
                .group(&args.group, &args.consumer)
                .count(args.batch)
                .block(200);
            let reply: Option<StreamReadReply> = redis
                .xread_options(&[&args.stream], &[">"], &options)
                .await?;
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                batch.extend(key.ids.iter().map(|e| to_event(&args.stream, e)));
            }
        }
        if batch.is_empty() {
            let pending: redis::streams::StreamPendingReply =
                redis.xpending(&args.stream, &args.group).await?;
            if args.exit_when_idle && pending.count() == 0 {
                break;
            }
            continue;
        }

        let mut to_ack = Vec::new();
        for event in batch {
            let id = event.id.clone();
            std::future::poll_fn(|cx| consumer.poll_ready(cx))
                .await
                .map_err(|e| format!("{e}"))?;
            match consumer.call(event).await {
                Ok(delivery) => {
                    match &delivery {
                        Delivery::Processed(_) => tally.processed += 1,
                        Delivery::Duplicate(_) | Delivery::DuplicateFailed(_) => {
                            tally.duplicates += 1
                        }
                        Delivery::InProgress => tally.in_progress += 1,
                    }
                    if delivery.should_ack() {
                        to_ack.push(id);
                    }
                }
                // Nothing a redelivery could fix: ack it, and say so.
                Err(ConsumerError::KeyReused) => {
                    eprintln!("message {id} reuses a key with another payload; dropped");
                    to_ack.push(id);
                }
                Err(error) => {
                    eprintln!("message {id} failed, left pending for redelivery: {error}");
                    tally.failed += 1;
                }
            }
            handled += 1;
            if args.crash_after == Some(handled) {
                eprintln!(
                    "{}: crashing after {handled} messages, before acking this batch",
                    args.consumer
                );
                std::process::abort();
            }
        }
        if !to_ack.is_empty() {
            let _: i64 = redis.xack(&args.stream, &args.group, &to_ack).await?;
        }
    }
    println!(
        "{}: processed {} duplicates {} in_progress {} failed {}",
        args.consumer, tally.processed, tally.duplicates, tally.in_progress, tally.failed
    );
    Ok(())
}
