//! What a delivery answers: its outcome, or why it failed.

use crate::protocol::Failure;
use crate::store::StoreError;
use crate::BoxError;

/// What the consumer service answers for one delivery. See the [module docs](super).
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
    /// The consumer is draining ([`DrainHandle`](crate::DrainHandle)): the handler did not
    /// run. Do not ack; another consumer will get the message.
    #[error("the consumer is shutting down")]
    ShuttingDown,
    /// Too many deliveries run on after their callers gave up on them (see
    /// [`Settings::max_detached`](crate::Settings::max_detached)): the handler did not run. Do not ack.
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

impl<E> From<StoreError> for ConsumerError<E> {
    fn from(error: StoreError) -> Self {
        ConsumerError::Store(Box::new(error))
    }
}
