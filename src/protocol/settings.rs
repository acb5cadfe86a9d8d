//! [`Settings`]: what every adapter shares — the store, the timings, the limits on detached
//! work, the outcome hook and the drain — written and documented once.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::{DrainHandle, Limits, OnConflict, Outcome, OutcomeHook, Timings, Tracker};
use crate::store::MemoryStore;

/// The settings every adapter shares: the store, the lease and retention, the store timeout,
/// what a duplicate gets while the original runs, the bounds on work detached from its caller,
/// the outcome hook and the drain.
///
/// Both [`IdempotencyLayer`](crate::IdempotencyLayer) and the consumer layer are built on one
/// (`with_settings`); their own setters cover only what is theirs (the HTTP header, scope and
/// response handling; the consumer's identity and final errors). Setters take `self` by value
/// and every one has a default (see [`defaults`](crate::defaults)), so `Settings::new(store)`
/// alone is complete.
///
/// Clones share one drain: give clones of the same settings to an HTTP layer and a consumer
/// layer, and one [`drain_handle`](Self::drain_handle) shuts both down.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, OnConflict, Settings};
/// use tower_idempotency::store::MemoryStore;
///
/// let settings = Settings::new(MemoryStore::new())
///     .lease(Duration::from_secs(30))
///     .ttl(Duration::from_secs(6 * 60 * 60))
///     .on_conflict(OnConflict::Wait(Duration::from_secs(5)));
/// let drain = settings.drain_handle();
/// let layer = IdempotencyLayer::with_settings(settings);
/// # let _ = (drain, layer);
/// ```
#[derive(Clone)]
pub struct Settings<St = MemoryStore> {
    pub(crate) store: St,
    pub(crate) shared: Arc<Shared>,
}

/// The part of [`Settings`] that is not the store, behind one `Arc` so that cloning the
/// settings (once per request) costs one reference count.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) timings: Timings,
    pub(crate) limits: Limits,
    pub(crate) on_outcome: OutcomeHook,
    /// Shared by every clone, also across a setter that copies `Shared`.
    pub(crate) tracker: Arc<Tracker>,
}

impl Default for Settings<MemoryStore> {
    /// Every default, on a fresh [`MemoryStore`].
    fn default() -> Self {
        Self::new(MemoryStore::new())
    }
}

impl<St> Settings<St> {
    /// Every default, on `store`.
    pub fn new(store: St) -> Self {
        Self {
            store,
            shared: Arc::new(Shared {
                timings: Timings::default(),
                limits: Limits::default(),
                on_outcome: OutcomeHook::none(),
                tracker: Arc::default(),
            }),
        }
    }

    fn shared(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.shared)
    }

    /// How long a claim lasts without renewal \[[`defaults::LEASE`](crate::defaults::LEASE)\].
    /// It is renewed every third of this while the work runs. A process that stops renewing
    /// loses its claim once the lease runs out, whatever the reason: it died, it is frozen
    /// (`SIGSTOP`, a stalled VM, a long GC-like pause of its runtime), or it cannot reach the
    /// store (partitioned). The key is then blocked for at most this long, after which a retry
    /// takes it over and runs the handler again (from the key's recovery point, if one was
    /// saved); should the old run wake up, its completion and saves are refused
    /// ([`StoreError::LeaseLost`](crate::store::StoreError::LeaseLost)), but a side effect it
    /// makes after waking is its own: pass the key to the provider too.
    ///
    /// # Panics
    ///
    /// Below 30 ms or above ten years.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.shared().timings.set_lease(lease);
        self
    }

    /// How long a completed outcome is kept for replay \[[`defaults::TTL`](crate::defaults::TTL)\]:
    /// longer than clients retry (and brokers redeliver). A key reused after this runs again.
    ///
    /// # Panics
    ///
    /// When zero or above ten years.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.shared().timings.set_ttl(ttl);
        self
    }

    /// The longest any store call may take
    /// \[[`defaults::STORE_TIMEOUT`](crate::defaults::STORE_TIMEOUT)\]; past it the call counts
    /// as a store failure.
    ///
    /// # Panics
    ///
    /// When zero or above ten years.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.shared().timings.set_store_timeout(timeout);
        self
    }

    /// What a duplicate gets while the original runs \[[`OnConflict::Reject`]: HTTP 409,
    /// `Delivery::InProgress` for a consumer\]; or wait for the original's outcome.
    ///
    /// # Panics
    ///
    /// A wait above ten years.
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.shared().timings.set_on_conflict(on_conflict);
        self
    }

    /// How many requests or deliveries may run on after their callers left (a client that
    /// disconnected, a timeout around the call)
    /// \[[`defaults::MAX_DETACHED`](crate::defaults::MAX_DETACHED)\]. Past it, new keyed work
    /// is refused (HTTP 503 `#overloaded` with `Retry-After`, `ConsumerError::Overloaded`)
    /// until some finishes: back-pressure instead of unbounded memory.
    pub fn max_detached(mut self, count: usize) -> Self {
        self.shared().limits.max_detached = count;
        self
    }

    /// How many request-body bytes detached requests may have declared (`Content-Length`)
    /// together \[[`defaults::MAX_DETACHED_BYTES`](crate::defaults::MAX_DETACHED_BYTES)\];
    /// past it new keyed requests are refused as by [`max_detached`](Self::max_detached).
    /// Messages declare no size, so only HTTP requests count.
    pub fn max_detached_bytes(mut self, bytes: u64) -> Self {
        self.shared().limits.max_detached_bytes = bytes;
        self
    }

    /// How many bytes of outcomes may wait for a store that failed at the moment of their
    /// completion
    /// \[[`defaults::MAX_PENDING_COMPLETIONS`](crate::defaults::MAX_PENDING_COMPLETIONS)\].
    /// Such a completion is retried in the background (the claim kept and renewed) until the
    /// store takes it; past this bound it is not retried, and its claim lapses with its lease
    /// (a retry after that runs again), as if the process had died.
    pub fn max_pending_completions(mut self, bytes: u64) -> Self {
        self.shared().limits.max_pending_bytes = bytes;
        self
    }

    /// The largest recovery point (phase and data) a handler may save through
    /// [`RecoveryPoints`](crate::RecoveryPoints)
    /// \[[`defaults::MAX_RECOVERY_POINT`](crate::defaults::MAX_RECOVERY_POINT)\]; a larger
    /// save is refused with [`RecoveryError::TooLarge`](crate::RecoveryError::TooLarge), never
    /// truncated.
    pub fn max_recovery_point(mut self, bytes: usize) -> Self {
        self.shared().limits.max_recovery_point = bytes;
        self
    }

    /// Called once for every request or delivery the adapter sees, with what became of it
    /// (see [`Outcome`]): feed your metrics from here \[none\]. It runs on the request's
    /// task: keep it cheap (increment a counter).
    pub fn on_outcome(mut self, hook: impl Fn(Outcome) + Send + Sync + 'static) -> Self {
        self.shared().on_outcome = OutcomeHook::new(hook);
        self
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    /// A handle to shut down gracefully every adapter built on these settings or a clone of
    /// them: once draining, new keyed work is refused (HTTP 503 `#shutting-down`,
    /// `ConsumerError::ShuttingDown`), work already running finishes and stores its outcome,
    /// and claims still held at the deadline are released. See [`DrainHandle`].
    pub fn drain_handle(&self) -> DrainHandle<St>
    where
        St: Clone,
    {
        DrainHandle::new(
            self.shared.tracker.clone(),
            self.store.clone(),
            self.shared.timings.store_timeout,
        )
    }

    pub(crate) fn timings(&self) -> &Timings {
        &self.shared.timings
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    pub(crate) fn hook(&self) -> &OutcomeHook {
        &self.shared.on_outcome
    }

    pub(crate) fn tracker(&self) -> &Arc<Tracker> {
        &self.shared.tracker
    }
}

impl<St: fmt::Debug> fmt::Debug for Settings<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("store", &self.store)
            .field("timings", &self.shared.timings)
            .field("limits", &self.shared.limits)
            .field("on_outcome", &self.shared.on_outcome)
            .finish_non_exhaustive()
    }
}
