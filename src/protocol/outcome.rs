//! [`Outcome`]: what became of one request or delivery, for metrics.

use std::fmt;
use std::sync::Arc;

/// What became of one request (or one delivery): the layer's `on_outcome` callback receives
/// exactly one per request it sees. Feed counters with it (see `examples/metrics/metrics.rs`);
/// [`as_str`](Self::as_str) is a stable label.
///
/// | outcome | HTTP answer | consumer answer |
/// |---|---|---|
/// | `Stored` | the handler's; its outcome is stored | `Processed` |
/// | `NotStored` | the handler's; storing failed (lease lost, or no room to retry): the claim lapses with its lease | `Processed` |
/// | `StoreRetrying` | the handler's; storing failed for a transient reason and is retried in the background while the claim is kept | `Processed` |
/// | `Released(reason)` | the handler's (or 500); the key is released so a retry runs | the handler's error |
/// | `Replayed` | the stored response, `idempotent-replayed: true` | `Duplicate` / `DuplicateFailed` |
/// | `Conflict` | 409: the original still runs | `InProgress` |
/// | `Mismatch` | 422: the key was used with another payload | `KeyReused` |
/// | `StoreError` | 503 (or the handler without idempotency, when failing open) | `Store` |
/// | `InvalidKey` | 400 | – |
/// | `MissingKey` | 400 (the key is required) | – |
/// | `MissingScope` | 500: the scope function found no tenant (authentication must run first) | – |
/// | `Passthrough` | the handler's, without idempotency (method not handled, no key, or unscoped requests allowed) | – |
/// | `BodyTooLarge` | 413: a duplicate's body is over the limit | – |
/// | `Unreadable` | 400 (the duplicate's body failed), 500 (the stored record is damaged) or 503 (it is from a newer release); the handler does not run | `Corrupt` / `UnknownFormat` |
/// | `ShuttingDown` | 503: the layer is draining | `ShuttingDown` |
/// | `Overloaded` | 503: too much work runs detached from its clients | – |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler ran and its outcome was stored.
    Stored,
    /// The handler ran; its outcome could not be stored.
    NotStored,
    /// The handler ran; storing its outcome failed for a transient reason and is being
    /// retried in the background (the claim is kept, duplicates get 409).
    StoreRetrying,
    /// The handler ran; its outcome was not to be kept, and the key was released.
    Released(ReleaseReason),
    /// A duplicate got the stored outcome; the handler did not run.
    Replayed,
    /// A duplicate arrived while the original still ran.
    Conflict,
    /// The key was used before with another payload.
    Mismatch,
    /// The store failed or was slower than the store timeout before the handler ran.
    StoreError,
    /// The key was malformed, too long, or sent twice.
    InvalidKey,
    /// The key is required and was absent.
    MissingKey,
    /// The scope function returned `None` and unscoped requests are refused.
    MissingScope,
    /// The request passed through without idempotency.
    Passthrough,
    /// A duplicate's body was over the limit.
    BodyTooLarge,
    /// A duplicate's body failed while being read, or the stored record cannot be read
    /// (damaged, or written by a newer release): the handler did not run.
    Unreadable,
    /// The layer is draining.
    ShuttingDown,
    /// Too much work runs detached from its clients.
    Overloaded,
}

/// Why the key of a request that ran was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReleaseReason {
    /// Its status is not stored (by default, 4xx and 5xx).
    Status,
    /// `Cache-Control: no-store` or the `NoStore` extension.
    NoStore,
    /// The inner service (or the message handler) returned an error.
    Error,
    /// The handler panicked.
    Panic,
    /// The response body failed while it was read.
    BodyError,
    /// No longer given: a gRPC answer over the response size limit was released with it (so
    /// a retry ran the call again). Such an answer is now kept by its head, and a duplicate
    /// gets `FAILED_PRECONDITION` ([`ProblemKind::AnswerNotStored`](crate::problem::ProblemKind::AnswerNotStored)).
    /// Kept so that code matching on it still builds.
    TooLarge,
}

impl ReleaseReason {
    /// A stable, lower-case label: `status`, `no_store`, `error`, `panic`, `body_error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ReleaseReason::Status => "status",
            ReleaseReason::NoStore => "no_store",
            ReleaseReason::Error => "error",
            ReleaseReason::Panic => "panic",
            ReleaseReason::BodyError => "body_error",
            ReleaseReason::TooLarge => "too_large",
        }
    }
}

impl Outcome {
    /// A stable, lower-case label, for metrics: `stored`, `released_status`, `replayed`, ...
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Stored => "stored",
            Outcome::NotStored => "not_stored",
            Outcome::StoreRetrying => "store_retrying",
            Outcome::Released(ReleaseReason::Status) => "released_status",
            Outcome::Released(ReleaseReason::NoStore) => "released_no_store",
            Outcome::Released(ReleaseReason::Error) => "released_error",
            Outcome::Released(ReleaseReason::Panic) => "released_panic",
            Outcome::Released(ReleaseReason::BodyError) => "released_body_error",
            Outcome::Released(ReleaseReason::TooLarge) => "released_too_large",
            Outcome::Replayed => "replayed",
            Outcome::Conflict => "conflict",
            Outcome::Mismatch => "mismatch",
            Outcome::StoreError => "store_error",
            Outcome::InvalidKey => "invalid_key",
            Outcome::MissingKey => "missing_key",
            Outcome::MissingScope => "missing_scope",
            Outcome::Passthrough => "passthrough",
            Outcome::BodyTooLarge => "body_too_large",
            Outcome::Unreadable => "unreadable",
            Outcome::ShuttingDown => "shutting_down",
            Outcome::Overloaded => "overloaded",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The callback a layer fires once per request.
#[derive(Clone)]
pub(crate) struct OutcomeHook(Option<Arc<dyn Fn(Outcome) + Send + Sync>>);

impl OutcomeHook {
    pub(crate) fn new(hook: impl Fn(Outcome) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(hook)))
    }

    pub(crate) fn none() -> Self {
        Self(None)
    }

    pub(crate) fn fire(&self, outcome: Outcome) {
        if let Some(hook) = &self.0 {
            hook(outcome);
        }
    }
}

impl fmt::Debug for OutcomeHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}
