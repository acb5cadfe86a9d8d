//! [`IdempotentConsumerLayer`]: the consumer adapter's own knobs over the shared [`Settings`].

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use crate::protocol::Settings;
use crate::store::MemoryStore;

use super::service::IdempotentConsumer;

pub(super) type FinalFn = dyn Fn(&dyn Any) -> bool + Send + Sync;

/// Makes a message handler idempotent. See the [module docs](super).
///
/// What every adapter shares (the store, lease, TTL, store timeout, conflicts, detached-work
/// bound, outcome hook and drain) is set on [`Settings`] and given to
/// [`with_settings`](Self::with_settings); [`final_errors`](Self::final_errors) is the
/// consumer's own.
#[derive(Clone)]
pub struct IdempotentConsumerLayer<I, St = MemoryStore> {
    pub(super) identify: I,
    pub(super) settings: Settings<St>,
    pub(super) final_errors: Arc<FinalFn>,
}

impl<I> IdempotentConsumerLayer<I, MemoryStore> {
    /// A layer identifying messages with `identify`, on a fresh [`MemoryStore`].
    pub fn new(identify: I) -> Self {
        Self::with_store(identify, MemoryStore::new())
    }
}

impl<I, St> IdempotentConsumerLayer<I, St> {
    /// A layer identifying messages with `identify`, on `store` with every default:
    /// `with_settings(identify, Settings::new(store))`.
    pub fn with_store(identify: I, store: St) -> Self {
        Self::with_settings(identify, Settings::new(store))
    }

    /// A layer identifying messages with `identify`, on `settings` (the store and what every
    /// adapter shares).
    pub fn with_settings(identify: I, settings: Settings<St>) -> Self {
        Self {
            identify,
            settings,
            final_errors: Arc::new(|_| false),
        }
    }

    /// The shared settings: the store, and the [drain handle](Settings::drain_handle) (once
    /// draining, new deliveries get
    /// [`ConsumerError::ShuttingDown`](super::ConsumerError::ShuttingDown): do not ack them).
    pub fn settings(&self) -> &Settings<St> {
        &self.settings
    }

    /// Which handler errors are final \[none\]: their text is stored as the outcome, so a
    /// redelivery answers [`Delivery::DuplicateFailed`](super::Delivery::DuplicateFailed) instead of running again. `E` is the
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
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}
