//! Graceful shutdown in process: what a draining layer admits, what it waits for, and what it
//! hands back at the deadline. (`tests/fleet.rs` does the same with real processes, SIGTERM
//! and a shared Redis or PostgreSQL.)

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{app, request, send};
use tower::{service_fn, BoxError, ServiceExt};
use tower_idempotency::consumer::{ConsumerError, Delivery, IdempotentConsumerLayer};
use tower_idempotency::store::MemoryStore;
use tower_idempotency::{IdempotencyLayer, Settings};

const BODY: &str = r#"{"amount": 1}"#;

/// While draining, new keyed requests get 503 problem+json with `Retry-After` and never reach
/// the handler; keyless requests are not the layer's business and still run.
#[tokio::test]
async fn a_draining_layer_refuses_new_keyed_requests_with_503() {
    let layer = IdempotencyLayer::new().retry_after(Duration::from_secs(2));
    let drain = layer.settings().drain_handle();
    let (mut app, probe) = app(layer);
    drain.start();
    assert!(drain.is_draining());
    let refused = send(&mut app, request(Some("k"), BODY, &[])).await;
    refused.assert_problem(503, "shutting-down");
    assert_eq!(refused.headers["retry-after"], "2");
    assert_eq!(probe.executions(), 0);
    assert_eq!(send(&mut app, request(None, BODY, &[])).await.status, 201);
    assert_eq!(probe.executions(), 1);
    assert!(drain.drain(Duration::from_secs(1)).await.is_clean());
}

/// Requests admitted before the drain run to their end and store their outcome, including
/// one whose caller dropped its future (the client went away): the drain waits for both and
/// releases nothing.
#[tokio::test(start_paused = true)]
async fn the_drain_waits_for_admitted_and_detached_requests_to_store_their_outcomes() {
    let store = MemoryStore::new();
    let layer = IdempotencyLayer::with_store(store.clone());
    let drain = layer.settings().drain_handle();
    let (app, probe) = app(layer);
    let waiting = tokio::spawn({
        let mut app = app.clone();
        async move {
            send(
                &mut app,
                request(Some("waited"), BODY, &[("x-delay-ms", "3000")]),
            )
            .await
        }
    });
    let abandoned = tokio::spawn({
        let mut app = app.clone();
        async move {
            send(
                &mut app,
                request(Some("gone"), BODY, &[("x-delay-ms", "3000")]),
            )
            .await
        }
    });
    probe.started(2).await;
    abandoned.abort();
    assert_eq!(drain.in_flight(), 2);
    let report = drain.drain(Duration::from_secs(30)).await;
    assert!(report.is_clean(), "{report:?}");
    assert!(report.waited() >= Duration::from_millis(2900), "{report:?}");
    // Woken by the last request's end, not by the deadline.
    assert!(report.waited() < Duration::from_secs(4), "{report:?}");
    assert_eq!(waiting.await.unwrap().status, 201);
    assert_eq!(drain.in_flight(), 0);
    // Another instance on the same store replays both.
    let (mut other, other_probe) = support::app(IdempotencyLayer::with_store(store));
    for key in ["waited", "gone"] {
        assert!(
            send(&mut other, request(Some(key), BODY, &[]))
                .await
                .replayed(),
            "{key}"
        );
    }
    assert_eq!(other_probe.executions(), 0);
    assert_eq!(probe.executions(), 2);
}

/// At the deadline the claims still held are released (and reported), so a retry elsewhere
/// runs at once instead of answering 409 for the whole lease.
#[tokio::test(start_paused = true)]
async fn at_the_deadline_held_claims_are_released_and_reported() {
    let store = MemoryStore::new();
    let layer = IdempotencyLayer::with_settings(
        Settings::new(store.clone()).lease(Duration::from_secs(600)),
    );
    let drain = layer.settings().drain_handle();
    let (app, probe) = app(layer);
    let _stuck = tokio::spawn({
        let mut app = app.clone();
        async move { send(&mut app, request(Some("stuck"), BODY, &[("x-hold", "1")])).await }
    });
    probe.started(1).await;
    let report = drain.drain(Duration::from_secs(2)).await;
    assert_eq!(report.released().len(), 1, "{report:?}");
    assert!(report.released()[0].ends_with("|stuck"), "{report:?}");
    assert!(report.not_released().is_empty());
    let (mut other, other_probe) = support::app(IdempotencyLayer::with_store(store));
    let retry = send(&mut other, request(Some("stuck"), BODY, &[])).await;
    assert_eq!(retry.status, 201, "the released key runs at once");
    assert_eq!(other_probe.executions(), 1);
}

/// A drain handle sees every service the layer (and its clones) made.
#[tokio::test]
async fn one_handle_drains_every_clone_of_the_layer() {
    let layer = IdempotencyLayer::new();
    let drain = layer.settings().drain_handle();
    let (mut first, _) = app(layer.clone());
    let (mut second, _) = app(layer);
    drain.start();
    for app in [&mut first, &mut second] {
        send(app, request(Some("k"), BODY, &[]))
            .await
            .assert_problem(503, "shutting-down");
    }
}

/// The consumer drains the same way: new deliveries are refused (not acked, the handler not
/// run), a delivery already running finishes and stores its outcome.
#[tokio::test(start_paused = true)]
async fn a_draining_consumer_refuses_new_deliveries_and_finishes_running_ones() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotentConsumerLayer::new(|m: &(String, u64)| m.0.clone());
    let drain = layer.settings().drain_handle();
    let consumer = tower::Layer::layer(
        &layer,
        service_fn({
            let runs = runs.clone();
            move |m: (String, u64)| {
                runs.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok::<_, BoxError>(m.1)
                }
            }
        }),
    );
    let running = tokio::spawn(consumer.clone().oneshot(("evt-1".to_owned(), 7)));
    while runs.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    drain.start();
    let refused = consumer.clone().oneshot(("evt-2".to_owned(), 8)).await;
    assert!(
        matches!(refused, Err(ConsumerError::ShuttingDown)),
        "{refused:?}"
    );
    let report = drain.drain(Duration::from_secs(30)).await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(running.await.unwrap().unwrap(), Delivery::Processed(7));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
