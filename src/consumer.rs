//! Idempotent message consumers (feature `consumer`): the same guarantee for event pipelines.
//!
//! Brokers deliver at least once: after a consumer crash, a rebalance or a missed ack, the same
//! message arrives again, and a handler that charges a card must not charge twice.
//! [`IdempotentConsumerLayer`] wraps any `Service<M>` (your handler) and drives the same
//! claim → complete | release protocol, against the same [`Store`]s, as the HTTP layer:
//!
//! | delivery | what happens | the service answers |
//! |---|---|---|
//! | first | key claimed (lease renewed while the handler runs), handler run, its outcome stored (serde JSON) for the TTL | `Delivery::Processed(outcome)` |
//! | redelivery after completion | handler **not** run | `Delivery::Duplicate(outcome)`, the stored outcome |
//! | redelivery while the first still runs | handler not run | `Delivery::InProgress`: nack / requeue it [or, with `OnConflict::Wait`, wait for the outcome] |
//! | handler error | claim released, so the broker's redelivery runs it again | `Err(ConsumerError::Handler)` |
//! | handler error that [`final_errors`] says is final | the error's text is stored as the outcome | `Err(ConsumerError::Handler)`, then `Delivery::DuplicateFailed(text)` on redelivery |
//! | same key, other fingerprint | handler not run | `Err(ConsumerError::KeyReused)` |
//! | store down or slow | handler not run | `Err(ConsumerError::Store)`: do not ack |
//! | handler panics | claim released, so the redelivery runs it again | `Err(ConsumerError::Panicked)` |
//! | the delivery's future is dropped after the claim (a timeout around it, the loop moved on) | the handler finishes in the background and its outcome is stored | (nothing: the caller is gone); the redelivery gets `Delivery::Duplicate` |
//!
//! A message names its key (and, optionally, a scope and a fingerprint) through a closure or
//! by implementing [`IdempotentMessage`]:
//!
//! ```
//! use std::convert::Infallible;
//! use serde::{Deserialize, Serialize};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_idempotency::consumer::{Delivery, IdempotentConsumerLayer};
//!
//! #[derive(Clone)]
//! struct PaymentRequested { event_id: String, amount: u64 }
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Charged { charge_id: String }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let consumer = ServiceBuilder::new()
//!     .layer(IdempotentConsumerLayer::new(|m: &PaymentRequested| m.event_id.clone()))
//!     .service(service_fn(|m: PaymentRequested| async move {
//!         Ok::<_, Infallible>(Charged { charge_id: format!("ch_{}", m.amount) })
//!     }));
//!
//! let event = PaymentRequested { event_id: "evt_1".into(), amount: 500 };
//! let first = consumer.clone().oneshot(event.clone()).await.unwrap();
//! assert_eq!(first, Delivery::Processed(Charged { charge_id: "ch_500".into() }));
//! let again = consumer.clone().oneshot(event).await.unwrap();
//! assert_eq!(again, Delivery::Duplicate(Charged { charge_id: "ch_500".into() }));
//! # }
//! ```
//!
//! `examples/stream_consumer.rs` runs a consumer group on a Redis Stream with this layer and the
//! Redis store; the README shows how to adapt it to Kafka, NATS or RabbitMQ.
//!
//! [`final_errors`]: IdempotentConsumerLayer::final_errors

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tower_layer::Layer;
use tower_service::Service;
use xxhash_rust::xxh3::xxh3_128;

use crate::protocol::seal::{self, Unreadable};
use crate::protocol::{
    self, Begin, DrainHandle, Failure, FinishOnDrop, Limits, OnConflict, Outcome, OutcomeHook,
    Refusal, ReleaseReason, Timings, Tracker,
};
use crate::store::{MemoryStore, Record, Store, StoreError};
use crate::BoxError;

/// Who a message is, for idempotency: its key, and optionally a scope and a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    scope: String,
    key: String,
    fingerprint: Option<u128>,
}

impl Identity {
    /// A message known by `key` (an event id, a business key).
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            scope: String::new(),
            key: key.into(),
            fingerprint: None,
        }
    }

    /// Keys of different scopes (tenants, topics) never meet.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = scope.into();
        self
    }

    /// A fingerprint of the payload (xxh3-128 of `bytes`): a redelivery with the same key but
    /// another payload is refused with [`ConsumerError::KeyReused`] instead of being
    /// treated as a duplicate.
    pub fn fingerprint(mut self, bytes: &[u8]) -> Self {
        self.fingerprint = Some(xxh3_128(bytes));
        self
    }

    fn store_key(&self) -> String {
        crate::admin::consumer_key(&self.scope, &self.key)
    }
}

impl From<String> for Identity {
    fn from(key: String) -> Self {
        Self::new(key)
    }
}

impl From<&str> for Identity {
    fn from(key: &str) -> Self {
        Self::new(key)
    }
}

/// A message type that knows its own identity.
pub trait IdempotentMessage {
    /// The message's idempotency key.
    fn idempotency_key(&self) -> Cow<'_, str>;

    /// Its full identity; override to add a scope or a fingerprint.
    fn identity(&self) -> Identity {
        Identity::new(self.idempotency_key().into_owned())
    }
}

/// How the layer tells who a message is: a closure `Fn(&M) -> impl Into<Identity>`, or
/// [`FromMessage`] for message types that implement [`IdempotentMessage`].
pub trait Identify<M> {
    /// The identity of `message`.
    fn identify(&self, message: &M) -> Identity;
}

impl<M, F, I> Identify<M> for F
where
    F: Fn(&M) -> I,
    I: Into<Identity>,
{
    fn identify(&self, message: &M) -> Identity {
        self(message).into()
    }
}

/// Identifies messages through their [`IdempotentMessage`] implementation.
#[derive(Debug, Clone, Copy, Default)]
pub struct FromMessage;

impl<M: IdempotentMessage> Identify<M> for FromMessage {
    fn identify(&self, message: &M) -> Identity {
        message.identity()
    }
}

/// What the consumer service answers for one delivery. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery<R> {
    /// First delivery: the handler ran and its outcome was stored.
    Processed(R),
    /// A redelivery: the handler did not run; here is the first delivery's outcome.
    Duplicate(R),
    /// A redelivery of a message whose handler failed with a final error: its text.
    DuplicateFailed(String),
    /// Another consumer is processing this message now: nack or requeue it.
    InProgress,
}

impl<R> Delivery<R> {
    /// Whether the handler ran for this delivery.
    pub fn ran(&self) -> bool {
        matches!(self, Delivery::Processed(_))
    }

    /// Whether the broker should be told the message is done (acked): everything but
    /// [`Delivery::InProgress`].
    pub fn should_ack(&self) -> bool {
        !matches!(self, Delivery::InProgress)
    }
}

/// Why a delivery could not be handled; `E` is the handler's error. Do not ack the message
/// (except after `KeyReused`, which no redelivery will fix).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError<E> {
    /// The handler failed.
    #[error("message handler failed: {0}")]
    Handler(E),
    /// The store failed or was slower than the store timeout; the handler did not run.
    #[error("idempotency store unavailable")]
    Store(#[source] BoxError),
    /// The key was seen before with another fingerprint; the handler did not run.
    #[error("idempotency key reused with a different payload")]
    KeyReused,
    /// The stored outcome is damaged (changed or cut in the store, or not of the handler's
    /// response type): the message *was* handled, so the handler did not run again. No
    /// redelivery will read it; ack it and alert (`admin` inspects and deletes the record).
    #[error("stored outcome cannot be decoded")]
    Corrupt(#[source] BoxError),
    /// The stored outcome was written by a newer release of this crate (a rolling upgrade):
    /// the handler did not run. Do not ack; a consumer of that release can answer the
    /// redelivery.
    #[error("stored outcome has format version {version}, newer than this build reads")]
    UnknownFormat {
        /// The format version found.
        version: u8,
    },
    /// The handler panicked: the key was released (a redelivery runs it again) and the panic
    /// message is here. Over HTTP the same event answers 500.
    #[error("message handler panicked: {0}")]
    Panicked(String),
    /// The consumer is draining ([`DrainHandle`]): the handler did not
    /// run. Do not ack; another consumer will get the message.
    #[error("the consumer is shutting down")]
    ShuttingDown,
    /// Too many deliveries run on after their callers gave up on them (see
    /// [`IdempotentConsumerLayer::max_detached`]): the handler did not run. Do not ack.
    #[error("too many deliveries still running")]
    Overloaded,
}

impl<E> From<Failure> for ConsumerError<E> {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Store(StoreError::UnknownFormat { version }) => {
                ConsumerError::UnknownFormat { version }
            }
            // The record exists but cannot be read: not an outage (the message was handled).
            Failure::Store(error @ StoreError::Corrupt(_)) => {
                ConsumerError::Corrupt(Box::new(error))
            }
            Failure::Store(error) => ConsumerError::Store(Box::new(error)),
            Failure::Timeout => ConsumerError::Store("store call timed out".into()),
        }
    }
}

type FinalFn = dyn Fn(&dyn Any) -> bool + Send + Sync;

/// Makes a message handler idempotent. See the [module docs](self).
#[derive(Clone)]
pub struct IdempotentConsumerLayer<I, St = MemoryStore> {
    identify: I,
    store: St,
    timings: Timings,
    final_errors: Arc<FinalFn>,
    tracker: Arc<Tracker>,
    limits: Limits,
    on_outcome: OutcomeHook,
}

impl<I> IdempotentConsumerLayer<I, MemoryStore> {
    /// A layer identifying messages with `identify`, on a fresh [`MemoryStore`].
    pub fn new(identify: I) -> Self {
        Self::with_store(identify, MemoryStore::new())
    }
}

impl<I, St> IdempotentConsumerLayer<I, St> {
    /// A layer identifying messages with `identify`, on `store`.
    pub fn with_store(identify: I, store: St) -> Self {
        Self {
            identify,
            store,
            timings: Timings::default(),
            final_errors: Arc::new(|_| false),
            tracker: Arc::default(),
            limits: Limits::default(),
            on_outcome: OutcomeHook::none(),
        }
    }

    /// How long a claim lasts without renewal [60 s]; renewed every third while the handler runs.
    ///
    /// # Panics
    ///
    /// Below 30 ms or above ten years.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.timings.set_lease(lease);
        self
    }

    /// How long outcomes are kept [24 h]: longer than the broker may redeliver.
    ///
    /// # Panics
    ///
    /// When zero or above ten years.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.timings.set_ttl(ttl);
        self
    }

    /// The longest any store call may take [5 s].
    ///
    /// # Panics
    ///
    /// When zero or above ten years.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.timings.set_store_timeout(timeout);
        self
    }

    /// How many deliveries may run on after their callers dropped them (a timeout around
    /// the call) \[1,024\]; past it, new deliveries get [`ConsumerError::Overloaded`].
    pub fn max_detached(mut self, deliveries: usize) -> Self {
        self.limits.max_detached = deliveries;
        self
    }

    /// The largest recovery point (phase and data) a handler may save through
    /// [`RecoveryPoints::current`](crate::RecoveryPoints::current) \[64 KiB\]; a larger save is
    /// refused, never truncated.
    pub fn max_recovery_point(mut self, bytes: usize) -> Self {
        self.limits.max_recovery_point = bytes;
        self
    }

    /// Called once per delivery with what became of it (see
    /// [`Outcome`]) \[none\]: feed your metrics from here.
    pub fn on_outcome(mut self, hook: impl Fn(crate::Outcome) + Send + Sync + 'static) -> Self {
        self.on_outcome = OutcomeHook::new(hook);
        self
    }

    /// What a redelivery gets while the first delivery runs [`OnConflict::Reject`]:
    /// [`Delivery::InProgress`]; or wait for the outcome.
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.timings.set_on_conflict(on_conflict);
        self
    }

    /// Which handler errors are final \[none\]: their text is stored as the outcome, so a
    /// redelivery answers [`Delivery::DuplicateFailed`] instead of running again. `E` is the
    /// handler's error type; errors of another type are never final.
    pub fn final_errors<E: 'static>(
        mut self,
        is_final: impl Fn(&E) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.final_errors =
            Arc::new(move |error: &dyn Any| error.downcast_ref::<E>().is_some_and(&is_final));
        self
    }
}

impl<I, St: Clone> IdempotentConsumerLayer<I, St> {
    /// A handle to shut this consumer down gracefully: once draining, new deliveries get
    /// [`ConsumerError::ShuttingDown`] (do not ack them), deliveries already running finish
    /// and store their outcomes, and claims still held at the deadline are released. See
    /// [`DrainHandle`].
    pub fn drain_handle(&self) -> DrainHandle<St> {
        DrainHandle::new(
            self.tracker.clone(),
            self.store.clone(),
            self.timings.store_timeout,
        )
    }
}

impl<S, I: Clone, St: Clone> Layer<S> for IdempotentConsumerLayer<I, St> {
    type Service = IdempotentConsumer<S, I, St>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotentConsumer {
            inner,
            layer: self.clone(),
        }
    }
}

impl<I, St: fmt::Debug> fmt::Debug for IdempotentConsumerLayer<I, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentConsumerLayer")
            .field("store", &self.store)
            .field("timings", &self.timings)
            .finish_non_exhaustive()
    }
}

/// The service [`IdempotentConsumerLayer`] makes.
#[derive(Clone)]
pub struct IdempotentConsumer<S, I, St = MemoryStore> {
    inner: S,
    layer: IdempotentConsumerLayer<I, St>,
}

impl<S: fmt::Debug, I, St: fmt::Debug> fmt::Debug for IdempotentConsumer<S, I, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentConsumer")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

/// What the store keeps for a message: JSON, inside the integrity envelope (`protocol::seal`)
/// as `"TC" version=1 length xxh3 json`. Outcomes written before the envelope (bare JSON,
/// starting with `{`) are still read, unchecked.
#[derive(Serialize, Deserialize)]
enum Stored<R> {
    Ok(R),
    Failed(String),
}

const MAGIC: &[u8; 2] = b"TC";
const VERSION: u8 = 1;

impl<R: Serialize> Stored<R> {
    fn encode(&self) -> Result<Bytes, serde_json::Error> {
        let mut buf = seal::start(MAGIC, VERSION, 64).writer();
        serde_json::to_writer(&mut buf, self)?;
        Ok(seal::finish(buf.into_inner()))
    }
}

impl<R: DeserializeOwned> Stored<R> {
    /// The outcome, or why it cannot be read (and the error that says so).
    fn decode(payload: &Bytes) -> Result<Self, (Unreadable, BoxError)> {
        let json = match payload.get(..3) {
            Some([b'T', b'C', VERSION]) => seal::open(payload),
            Some([b'T', b'C', 0]) => Err(Unreadable::Damaged("format version 0")),
            Some([b'T', b'C', version]) => Err(Unreadable::Newer(*version)),
            Some([b'{', ..]) => Ok(payload.clone()),
            _ => Err(Unreadable::Damaged("not a stored outcome")),
        };
        let json = json.map_err(|unreadable| (unreadable, Box::new(unreadable) as BoxError))?;
        serde_json::from_slice(&json).map_err(|error| {
            let unreadable = Unreadable::Damaged("not an outcome of the handler's type");
            (unreadable, Box::new(error) as BoxError)
        })
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, I, St, M> Service<M> for IdempotentConsumer<S, I, St>
where
    S: Service<M> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Serialize + DeserializeOwned + Send + 'static,
    S::Error: fmt::Display + Send + 'static,
    I: Identify<M>,
    St: Store + Clone,
    M: Send + 'static,
{
    type Response = Delivery<S::Response>;
    type Error = ConsumerError<S::Error>;
    type Future = BoxFuture<Result<Delivery<S::Response>, ConsumerError<S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(ConsumerError::Handler)
    }

    fn call(&mut self, message: M) -> Self::Future {
        let identity = self.layer.identify.identify(&message);
        let inner = protocol::take_ready(&mut self.inner);
        let layer = &self.layer;
        let (store, timings) = (layer.store.clone(), layer.timings);
        let max_point = layer.limits.max_recovery_point;
        let (final_errors, hook) = (layer.final_errors.clone(), layer.on_outcome.clone());
        let admitted = layer.tracker.enter(&layer.limits);
        let span = tracing::debug_span!("idempotent_consumer", key = %identity.key, scope = %identity.scope);
        let work = async move {
            let delivered = protocol::catch_unwind(async move {
                let ticket = match admitted {
                    Ok(ticket) => ticket,
                    Err(Refusal::Draining) => {
                        tracing::info!(outcome = "shutting_down", "draining: delivery refused");
                        return (Err(ConsumerError::ShuttingDown), Outcome::ShuttingDown);
                    }
                    Err(Refusal::Overloaded) => {
                        tracing::warn!(outcome = "overloaded", "delivery refused");
                        return (Err(ConsumerError::Overloaded), Outcome::Overloaded);
                    }
                };
                let rules = Rules {
                    store: &store,
                    timings: &timings,
                    final_errors: &*final_errors,
                    max_point,
                };
                deliver(&rules, identity, ticket, inner, message).await
            })
            .await;
            let (result, outcome) = delivered.unwrap_or_else(|panic| {
                panic.report();
                let error = ConsumerError::Panicked(panic.message().to_owned());
                (Err(error), Outcome::Released(ReleaseReason::Panic))
            });
            hook.fire(outcome);
            result
        };
        Box::pin(FinishOnDrop::new(
            Box::pin(tracing::Instrument::instrument(work, span)),
            self.layer.tracker.clone(),
            0,
        ))
    }
}

type Answer<R, E> = Result<Delivery<R>, ConsumerError<E>>;

/// What a delivery runs under: the layer's store and settings.
struct Rules<'a, St> {
    store: &'a St,
    timings: &'a Timings,
    final_errors: &'a FinalFn,
    /// The largest recovery point a handler may save.
    max_point: usize,
}

/// One admitted delivery: claim, run the handler under the claim, store or release.
async fn deliver<S, M, St>(
    rules: &Rules<'_, St>,
    identity: Identity,
    ticket: protocol::Ticket,
    mut inner: S,
    message: M,
) -> (Answer<S::Response, S::Error>, Outcome)
where
    S: Service<M>,
    S::Response: Serialize + DeserializeOwned,
    S::Error: fmt::Display + 'static,
    St: Store + Clone,
{
    let Rules {
        store,
        timings,
        final_errors,
        max_point,
    } = *rules;
    let guard = match protocol::begin(store, identity.store_key(), timings, ticket).await {
        Ok(Begin::Claimed(guard)) => guard,
        Ok(Begin::InFlight { .. }) => {
            tracing::info!(
                outcome = "in_progress",
                "message is being processed elsewhere"
            );
            return (Ok(Delivery::InProgress), Outcome::Conflict);
        }
        Ok(Begin::Completed { record, .. }) => return duplicate(&identity, record),
        Err(failure) => return (Err(failure.into()), Outcome::StoreError),
    };
    tracing::debug!(outcome = "claimed", "running the handler");
    // The handler reaches the key's recovery points through `RecoveryPoints::current()`.
    let points = guard.recovery_points(timings.ttl, max_point);
    let result = match guard.run(points.scope(inner.call(message))).await {
        Ok(result) => result,
        Err(panic) => {
            panic.report();
            guard.release().await;
            let error = ConsumerError::Panicked(panic.message().to_owned());
            return (Err(error), Outcome::Released(ReleaseReason::Panic));
        }
    };
    let stored = match &result {
        Ok(outcome) => Some(Stored::Ok(outcome).encode()),
        Err(error) if final_errors(error) => Some(Stored::<()>::Failed(error.to_string()).encode()),
        Err(_) => None,
    };
    let outcome = match stored {
        Some(Ok(payload)) => guard
            .complete(Record::new(identity.fingerprint, payload))
            .await
            .into(),
        Some(Err(error)) => {
            guard.release().await;
            let error = ConsumerError::Corrupt(Box::new(error));
            return (Err(error), Outcome::Released(ReleaseReason::Error));
        }
        None => {
            tracing::info!(
                outcome = "not_stored",
                reason = "handler_error",
                "releasing the key for redelivery"
            );
            guard.release().await;
            Outcome::Released(ReleaseReason::Error)
        }
    };
    let answer = result
        .map(Delivery::Processed)
        .map_err(ConsumerError::Handler);
    (answer, outcome)
}

/// A redelivery of a completed message.
fn duplicate<R: DeserializeOwned, E>(
    identity: &Identity,
    record: Record,
) -> (Answer<R, E>, Outcome) {
    if !protocol::same_payload(record.fingerprint(), identity.fingerprint) {
        return (Err(ConsumerError::KeyReused), Outcome::Mismatch);
    }
    tracing::debug!(
        outcome = "duplicate",
        "redelivery of a completed message; handler not run"
    );
    match Stored::<R>::decode(record.payload()) {
        Ok(Stored::Ok(outcome)) => (Ok(Delivery::Duplicate(outcome)), Outcome::Replayed),
        Ok(Stored::Failed(text)) => (Ok(Delivery::DuplicateFailed(text)), Outcome::Replayed),
        Err((unreadable, cause)) => {
            seal::report(seal::identity(record.payload()), unreadable, &cause);
            let error = match unreadable {
                Unreadable::Newer(version) => ConsumerError::UnknownFormat { version },
                Unreadable::Damaged(_) => ConsumerError::Corrupt(cause),
            };
            (Err(error), Outcome::Unreadable)
        }
    }
}

impl<E> From<StoreError> for ConsumerError<E> {
    fn from(error: StoreError) -> Self {
        ConsumerError::Store(Box::new(error))
    }
}
