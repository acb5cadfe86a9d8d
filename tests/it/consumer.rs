//! The message-consumer adapter: one handler run per key, whatever the redeliveries, on every store.

use crate::support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use support::servers;
use support::{Fault, FaultyStore};
use tokio::sync::{Barrier, Semaphore};
use tower::{service_fn, BoxError, Service, ServiceExt};
use tower_idempotency::consumer::{
    ConsumerError, Delivery, FromMessage, IdempotentConsumerLayer, IdempotentMessage, Identity,
};
use tower_idempotency::store::{MemoryStore, PostgresStore, RedisStore, Store};
use tower_idempotency::{OnConflict, Settings};

#[derive(Clone, Debug)]
struct Event {
    id: String,
    amount: u64,
}

impl IdempotentMessage for Event {
    fn idempotency_key(&self) -> std::borrow::Cow<'_, str> {
        self.id.as_str().into()
    }

    fn identity(&self) -> Identity {
        Identity::new(self.id.clone())
            .scope("payments")
            .fingerprint(&self.amount.to_le_bytes())
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Applied {
    run: usize,
    amount: u64,
}

/// The side effects a handler applied, per message id.
#[derive(Clone, Default)]
struct Effects(Arc<Mutex<HashMap<String, usize>>>);

impl Effects {
    fn count(&self, id: &str) -> usize {
        self.0.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }
}

type Consumer<St> = tower_idempotency::consumer::IdempotentConsumer<
    tower::util::BoxCloneSyncService<Event, Applied, BoxError>,
    FromMessage,
    St,
>;

/// A consumer over `store` whose handler applies one effect per run, after `delay`.
fn consumer<St: Store + Clone>(store: St, effects: Effects, delay: Duration) -> Consumer<St> {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = service_fn(move |event: Event| {
        let (effects, runs) = (effects.clone(), runs.clone());
        async move {
            tokio::time::sleep(delay).await;
            *effects
                .0
                .lock()
                .unwrap()
                .entry(event.id.clone())
                .or_default() += 1;
            Ok::<_, BoxError>(Applied {
                run: runs.fetch_add(1, Ordering::SeqCst) + 1,
                amount: event.amount,
            })
        }
    });
    tower::Layer::layer(
        &IdempotentConsumerLayer::with_store(FromMessage, store),
        tower::util::BoxCloneSyncService::new(handler),
    )
}

/// One delivery, as a spawnable future: the service's future is boxed and `Send`.
fn deliver<S>(
    mut service: S,
    message: Event,
) -> impl std::future::Future<Output = Delivery<Applied>> + Send
where
    S: Service<Event, Response = Delivery<Applied>>,
    S::Future: Send + 'static,
    S::Error: std::fmt::Debug,
{
    let call = service.call(message);
    async move { call.await.unwrap() }
}

fn event(prefix: &str, n: usize) -> Event {
    Event {
        id: format!("{prefix}-{n}-{:x}", fastrand_u64()),
        amount: 100 + n as u64,
    }
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now())
}

/// Each message delivered 1, 2 and 10 times, in sequence and concurrently (barrier): one run
/// per key, every other delivery a duplicate (or in progress) carrying the same outcome.
async fn duplicate_deliveries_run_the_handler_once<St: Store + Clone>(store: St) {
    let effects = Effects::default();
    let service = consumer(store, effects.clone(), Duration::from_millis(5));
    for copies in [1usize, 2, 10] {
        // In sequence.
        let message = event("seq", copies);
        let mut outcomes = Vec::new();
        for _ in 0..copies {
            outcomes.push(service.clone().oneshot(message.clone()).await.unwrap());
        }
        assert!(outcomes[0].ran());
        assert!(outcomes[1..]
            .iter()
            .all(|d| matches!(d, Delivery::Duplicate(a) if a.amount == message.amount)));
        assert_eq!(
            effects.count(&message.id),
            1,
            "{copies} deliveries in sequence"
        );

        // Concurrently.
        let message = event("concurrent", copies);
        let barrier = Arc::new(Barrier::new(copies));
        let tasks: Vec<_> = (0..copies)
            .map(|_| {
                let (service, message, barrier) =
                    (service.clone(), message.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    deliver(service, message).await
                })
            })
            .collect();
        let mut ran = 0;
        for task in tasks {
            let delivery = task.await.unwrap();
            ran += usize::from(delivery.ran());
            assert!(matches!(
                delivery,
                Delivery::Processed(_) | Delivery::Duplicate(_) | Delivery::InProgress
            ));
        }
        assert_eq!(ran, 1, "{copies} concurrent deliveries");
        assert_eq!(effects.count(&message.id), 1);
    }
    assert_eq!(effects.total(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_deliveries_run_once_memory_store() {
    duplicate_deliveries_run_the_handler_once(MemoryStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_deliveries_run_once_redis_store() {
    let Some(url) = servers::redis_url() else {
        return;
    };
    duplicate_deliveries_run_the_handler_once(RedisStore::connect(&url).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_deliveries_run_once_postgres_store() {
    let Some(url) = servers::postgres_url() else {
        return;
    };
    let store = PostgresStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    duplicate_deliveries_run_the_handler_once(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiting_redeliveries_get_the_outcome() {
    let effects = Effects::default();
    let gate = Arc::new(Semaphore::new(0));
    let handler = service_fn({
        let (effects, gate) = (effects.clone(), gate.clone());
        move |event: Event| {
            let (effects, gate) = (effects.clone(), gate.clone());
            async move {
                gate.acquire().await.unwrap().forget();
                *effects.0.lock().unwrap().entry(event.id).or_default() += 1;
                Ok::<_, BoxError>(Applied {
                    run: 1,
                    amount: event.amount,
                })
            }
        }
    });
    let service = IdempotentConsumerLayer::with_settings(
        FromMessage,
        Settings::default().on_conflict(OnConflict::Wait(Duration::from_secs(30))),
    )
    .layer_on(handler);
    let message = event("wait", 1);
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let (service, message) = (service.clone(), message.clone());
            tokio::spawn(async move { deliver(service, message).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.add_permits(1);
    let mut processed = 0;
    for task in tasks {
        match task.await.unwrap() {
            Delivery::Processed(_) => processed += 1,
            Delivery::Duplicate(applied) => assert_eq!(applied.amount, message.amount),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(processed, 1);
    assert_eq!(effects.count(&message.id), 1);
}

trait LayerOn<S> {
    type Service;
    fn layer_on(&self, inner: S) -> Self::Service;
}

impl<S, L: tower::Layer<S>> LayerOn<S> for L {
    type Service = L::Service;
    fn layer_on(&self, inner: S) -> L::Service {
        self.layer(inner)
    }
}

#[tokio::test]
async fn a_handler_error_releases_the_key_so_redelivery_runs_again() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let handler = service_fn({
        let attempts = attempts.clone();
        move |event: Event| {
            let n = attempts.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err::<Applied, BoxError>("payment provider timed out".into())
                } else {
                    Ok(Applied {
                        run: n + 1,
                        amount: event.amount,
                    })
                }
            }
        }
    });
    let service = IdempotentConsumerLayer::new(FromMessage).layer_on(handler);
    let message = event("retry", 1);
    assert!(matches!(
        service.clone().oneshot(message.clone()).await,
        Err(ConsumerError::Handler(_))
    ));
    assert!(
        service
            .clone()
            .oneshot(message.clone())
            .await
            .unwrap()
            .ran(),
        "the redelivery runs"
    );
    assert!(matches!(
        service.clone().oneshot(message).await.unwrap(),
        Delivery::Duplicate(_)
    ));
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn final_errors_are_stored_and_not_run_again() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let handler = service_fn({
        let attempts = attempts.clone();
        move |_event: Event| {
            attempts.fetch_add(1, Ordering::SeqCst);
            async move { Err::<Applied, BoxError>("card declined".into()) }
        }
    });
    let service = IdempotentConsumerLayer::new(FromMessage)
        .final_errors(|error: &BoxError| error.to_string().contains("declined"))
        .layer_on(handler);
    let message = event("final", 1);
    assert!(matches!(
        service.clone().oneshot(message.clone()).await,
        Err(ConsumerError::Handler(_))
    ));
    assert_eq!(
        service.clone().oneshot(message).await.unwrap(),
        Delivery::DuplicateFailed("card declined".into())
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_same_key_with_another_payload_is_refused() {
    let effects = Effects::default();
    let service = consumer(MemoryStore::new(), effects.clone(), Duration::ZERO);
    let message = event("fingerprint", 1);
    service.clone().oneshot(message.clone()).await.unwrap();
    let tampered = Event {
        amount: 9999,
        ..message.clone()
    };
    assert!(matches!(
        service.clone().oneshot(tampered).await,
        Err(ConsumerError::KeyReused)
    ));
    assert_eq!(effects.count(&message.id), 1);
}

#[tokio::test]
async fn a_store_outage_runs_nothing_and_says_so() {
    let store = FaultyStore::new();
    let effects = Effects::default();
    let service = consumer(store.clone(), effects.clone(), Duration::ZERO);
    store.set(Fault::Fail);
    let message = event("outage", 1);
    assert!(matches!(
        service.clone().oneshot(message.clone()).await,
        Err(ConsumerError::Store(_))
    ));
    assert_eq!(effects.total(), 0);
    store.set(Fault::None);
    assert!(service.oneshot(message).await.unwrap().ran());
}

#[tokio::test]
async fn closures_identify_messages_too() {
    let mut service = IdempotentConsumerLayer::new(|m: &(String, u32)| {
        Identity::new(m.0.clone()).scope("closures")
    })
    .layer_on(service_fn(|m: (String, u32)| async move {
        Ok::<_, BoxError>(m.1)
    }));
    let first = service
        .ready()
        .await
        .unwrap()
        .call(("k".to_owned(), 1))
        .await
        .unwrap();
    let second = service
        .ready()
        .await
        .unwrap()
        .call(("k".to_owned(), 2))
        .await
        .unwrap();
    assert_eq!(
        (first, second),
        (Delivery::Processed(1), Delivery::Duplicate(1))
    );
}

// The semantics every adapter shares (see the `protocol` module): a dropped future finishes
// its work detached, and a panic releases the key.

/// A consumer loop that gives up on a delivery (a timeout around the call, a shutdown of the
/// loop) after the key was claimed must not leave it blocked: the handler finishes in the
/// background, its outcome is stored, and the redelivery is a duplicate.
#[tokio::test(start_paused = true)]
async fn a_dropped_delivery_finishes_detached_and_its_redelivery_is_a_duplicate() {
    let store = MemoryStore::new();
    let effects = Effects::default();
    let service = consumer(store.clone(), effects.clone(), Duration::from_secs(2));
    let message = event("dropped", 0);
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        deliver(service.clone(), message.clone()),
    )
    .await;
    assert!(gave_up.is_err(), "the delivery was abandoned mid-handler");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(effects.count(&message.id), 1, "the handler ran to its end");
    match deliver(service, message.clone()).await {
        Delivery::Duplicate(applied) => assert_eq!(applied.amount, message.amount),
        other => panic!("expected the stored outcome, got {other:?}"),
    }
    assert_eq!(effects.count(&message.id), 1);
}

/// A panicking handler is an error like the HTTP adapter's 500: the key is released so the
/// redelivery runs, and the caller gets the panic message instead of a re-raised panic.
#[tokio::test]
async fn a_panicking_handler_releases_the_key_and_reports_the_panic() {
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        service_fn(move |event: Event| {
            let run = runs.fetch_add(1, Ordering::SeqCst);
            async move {
                if run == 0 {
                    panic!("card network exploded");
                }
                Ok::<_, BoxError>(Applied {
                    run: run + 1,
                    amount: event.amount,
                })
            }
        })
    };
    let mut service = tower::Layer::layer(&IdempotentConsumerLayer::new(FromMessage), handler);
    let message = event("panics", 0);
    let first = service
        .ready()
        .await
        .unwrap()
        .call(message.clone())
        .await
        .expect_err("the panic is an error");
    assert!(
        matches!(&first, ConsumerError::Panicked(text) if text == "card network exploded"),
        "{first:?}"
    );
    let again = service.ready().await.unwrap().call(message).await.unwrap();
    assert!(matches!(again, Delivery::Processed(Applied { run: 2, .. })));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
