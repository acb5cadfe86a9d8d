//! [`IdempotentConsumerLayer`] and its settings.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::protocol::{DrainHandle, Limits, OnConflict, OutcomeHook, Timings, Tracker};
use crate::store::MemoryStore;

use super::service::IdempotentConsumer;

pub(super) type FinalFn = dyn Fn(&dyn Any) -> bool + Send + Sync;

/// Makes a message handler idempotent. See the [module docs](super).
#[derive(Clone)]
pub struct IdempotentConsumerLayer<I, St = MemoryStore> {
    pub(super) identify: I,
    pub(super) store: St,
    pub(super) timings: Timings,
    pub(super) final_errors: Arc<FinalFn>,
    pub(super) tracker: Arc<Tracker>,
    pub(super) limits: Limits,
    pub(super) on_outcome: OutcomeHook,
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
    /// the call) \[1,024\]; past it, new deliveries get [`ConsumerError::Overloaded`](super::ConsumerError::Overloaded).
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
    /// [`Outcome`](crate::Outcome)) \[none\]: feed your metrics from here.
    pub fn on_outcome(mut self, hook: impl Fn(crate::Outcome) + Send + Sync + 'static) -> Self {
        self.on_outcome = OutcomeHook::new(hook);
        self
    }

    /// What a redelivery gets while the first delivery runs [`OnConflict::Reject`]:
    /// [`Delivery::InProgress`](super::Delivery::InProgress); or wait for the outcome.
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.timings.set_on_conflict(on_conflict);
        self
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

impl<I, St: Clone> IdempotentConsumerLayer<I, St> {
    /// A handle to shut this consumer down gracefully: once draining, new deliveries get
    /// [`ConsumerError::ShuttingDown`](super::ConsumerError::ShuttingDown) (do not ack them), deliveries already running finish
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
