//! [`IdempotentConsumer`]: one delivery, claimed, run, stored or released.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tower_service::Service;

use crate::protocol::{
    self, Begin, FinishOnDrop, Outcome, Refusal, ReleaseReason, RequestFingerprint, Settings,
};
use crate::store::seal::{self, Unreadable};
use crate::store::{MemoryStore, Record, Store};
use crate::BoxError;

use super::error::{ConsumerError, Delivery};
use super::identity::{Identify, Identity};
use super::layer::IdempotentConsumerLayer;

use super::layer::FinalFn;

/// The service [`IdempotentConsumerLayer`] makes.
#[derive(Clone)]
pub struct IdempotentConsumer<S, I, St = MemoryStore> {
    pub(super) inner: S,
    pub(super) layer: IdempotentConsumerLayer<I, St>,
}

impl<S: fmt::Debug, I, St: fmt::Debug> fmt::Debug for IdempotentConsumer<S, I, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentConsumer")
            .field("inner", &self.inner)
            .field("layer", &self.layer)
            .finish()
    }
}

/// What the store keeps for a message: JSON, inside the integrity envelope (`store::seal`)
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

/// The future of [`IdempotentConsumer`]: the delivery's outcome, or why it failed. Boxed: the
/// delivery runs on to its end even if this future is dropped (see the module docs).
pub type ConsumerFuture<R, E> =
    Pin<Box<dyn Future<Output = Result<Delivery<R>, ConsumerError<E>>> + Send>>;

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
    type Future = ConsumerFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(ConsumerError::Handler)
    }

    fn call(&mut self, message: M) -> Self::Future {
        let identity = self.layer.identify.identify(&message);
        let inner = protocol::take_ready(&mut self.inner);
        let settings = self.layer.settings.clone();
        let final_errors = self.layer.final_errors.clone();
        let admitted = settings.tracker().enter(settings.limits());
        let (hook, tracker) = (settings.hook().clone(), settings.tracker().clone());
        let span = tracing::debug_span!("idempotent_consumer", key = %identity.key, scope = %identity.scope);
        let work = async move {
            let delivered = protocol::catch_unwind(async move {
                let ticket = match admitted {
                    Ok(ticket) => ticket,
                    Err(refusal) => {
                        let error = match refusal {
                            Refusal::Draining => ConsumerError::ShuttingDown,
                            Refusal::Overloaded => ConsumerError::Overloaded,
                        };
                        return (Err(error), refusal.outcome());
                    }
                };
                let rules = Rules {
                    settings: &settings,
                    final_errors: &*final_errors,
                };
                deliver(&rules, identity, ticket, inner, message).await
            })
            .await;
            let (result, outcome) = delivered.unwrap_or_else(|panic| {
                let error = ConsumerError::Panicked(panic.message().to_owned());
                (Err(error), Outcome::Released(ReleaseReason::Panic))
            });
            hook.fire(outcome);
            result
        };
        Box::pin(FinishOnDrop::new(
            Box::pin(tracing::Instrument::instrument(work, span)),
            tracker,
            0,
        ))
    }
}

type Answer<R, E> = Result<Delivery<R>, ConsumerError<E>>;

/// What a delivery runs under: the layer's store and settings.
struct Rules<'a, St> {
    settings: &'a Settings<St>,
    final_errors: &'a FinalFn,
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
        settings,
        final_errors,
    } = *rules;
    let (store, timings) = (settings.store(), settings.timings());
    let mut begun = protocol::begin(store, identity.store_key(), timings, ticket, None).await;
    if let Ok(Begin::MayJoin { ticket, key }) = begun {
        // A message has no stream to join: it waits as `Wait` does.
        let timings = protocol::Timings {
            join: false,
            ..*timings
        };
        begun = protocol::begin(store, key, &timings, ticket, None).await;
    }
    let guard = match begun {
        Ok(Begin::Claimed(guard)) => guard,
        Ok(Begin::InFlight { .. } | Begin::MayJoin { .. }) => {
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
    let points = guard.recovery_points(
        timings.ttl,
        settings.limits().max_recovery_point,
        RequestFingerprint::Known(identity.fingerprint),
    );
    let result = guard.run(points.clone().scope(inner.call(message))).await;
    if points.reused() {
        // The key's point belongs to a message with another payload: whatever the handler
        // did with the refusal, the redelivery is refused and the point kept for its owner.
        guard.release().await;
        return (Err(ConsumerError::KeyReused), Outcome::Mismatch);
    }
    let result = match result {
        Ok(result) => result,
        Err(panic) if points.unsaved() => {
            // A save failed after a side effect: keep the key (as a failure) rather than let
            // a redelivery repeat it.
            let text = format!(
                "handler panicked after a recovery point was not saved: {}",
                panic.message()
            );
            return keep_failure(guard, &identity, text).await;
        }
        Err(panic) => {
            guard.release().await;
            let error = ConsumerError::Panicked(panic.message().to_owned());
            return (Err(error), Outcome::Released(ReleaseReason::Panic));
        }
    };
    let stored = match &result {
        Ok(outcome) => Some(Stored::Ok(outcome).encode()),
        Err(error) if final_errors(error) || points.unsaved() => {
            Some(Stored::<()>::Failed(error.to_string()).encode())
        }
        Err(_) => None,
    };
    let outcome = match stored {
        Some(Ok(payload)) => guard
            .complete(Record::new(identity.fingerprint, payload))
            .await
            .into(),
        Some(Err(error)) if points.unsaved() => {
            let text = format!("the handler's outcome could not be encoded ({error}) after a recovery point was not saved");
            return keep_failure(guard, &identity, text).await;
        }
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

/// Stores `text` as the message's final failure (its redeliveries get
/// [`Delivery::DuplicateFailed`]): for a run whose side effect may be recorded nowhere else.
async fn keep_failure<R, E, St: Store>(
    guard: protocol::ClaimGuard<St>,
    identity: &Identity,
    text: String,
) -> (Answer<R, E>, Outcome) {
    tracing::error!(outcome = "stored", "a recovery point was not saved and the handler failed; storing the failure instead of releasing the key");
    match Stored::<()>::Failed(text.clone()).encode() {
        Ok(payload) => {
            let outcome = guard
                .complete(Record::new(identity.fingerprint, payload))
                .await
                .into();
            (Err(ConsumerError::Panicked(text)), outcome)
        }
        Err(error) => {
            guard.release().await;
            (
                Err(ConsumerError::Corrupt(Box::new(error))),
                Outcome::Released(ReleaseReason::Error),
            )
        }
    }
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
