//! What identifies a message: its key, scope and fingerprint.

use std::borrow::Cow;

use xxhash_rust::xxh3::xxh3_128;

/// Who a message is, for idempotency: its key, and optionally a scope and a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub(super) scope: String,
    pub(super) key: String,
    pub(super) fingerprint: Option<u128>,
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
    /// another payload is refused with [`ConsumerError::KeyReused`](super::ConsumerError::KeyReused) instead of being
    /// treated as a duplicate.
    pub fn fingerprint(mut self, bytes: &[u8]) -> Self {
        self.fingerprint = Some(xxh3_128(bytes));
        self
    }

    pub(super) fn store_key(&self) -> String {
        store_key(&self.scope, &self.key)
    }
}

/// The store key of a message, as the consumer layer builds it from an [`Identity`]'s scope
/// (empty without one) and key. Re-exported as
/// [`admin::consumer_key`](crate::admin::consumer_key).
pub fn store_key(scope: &str, key: &str) -> String {
    crate::protocol::composite_key("consumer|", &[scope], key)
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
