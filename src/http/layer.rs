//! [`IdempotencyLayer`]: every knob of the layer, each with its default.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, Method, StatusCode};
use tower_layer::Layer;

use super::fingerprint::Fingerprint;
use super::service::Idempotency;
use crate::protocol::{DrainHandle, Limits, OnConflict, Outcome, OutcomeHook, Timings, Tracker};
use crate::store::MemoryStore;

type PredicateFn = dyn Fn(&Parts) -> bool + Send + Sync;
type ScopeFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;
type StatusFn = dyn Fn(StatusCode) -> bool + Send + Sync;
type TtlFn = dyn Fn(&Parts) -> Option<Duration> + Send + Sync;

/// What a request gets when the store fails or is slower than the store timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnStoreError {
    /// Answer 503 with `Retry-After`; the handler does not run (the default).
    FailClosed,
    /// Run the handler without idempotency and log a warning.
    FailOpen,
}

/// Which requests are gRPC calls, answered in gRPC's terms. See the README's gRPC section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrpcMode {
    /// A request whose `content-type` is `application/grpc` (or `application/grpc+…`) is a
    /// gRPC call (the default).
    Detect,
    /// Every handled request is a gRPC call.
    Always,
    /// No request is: gRPC calls are handled as plain HTTP (their failures, HTTP 200 with a
    /// non-zero `grpc-status`, would then be stored).
    Never,
}

/// The layer's configuration, shared by every clone of the service.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) header: HeaderName,
    pub(crate) max_key_len: usize,
    pub(crate) require_key: bool,
    pub(crate) methods: Vec<Method>,
    pub(crate) predicate: Option<Arc<PredicateFn>>,
    pub(crate) scope: Option<Arc<ScopeFn>>,
    pub(crate) allow_unscoped: bool,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) timings: Timings,
    pub(crate) ttl_fn: Option<Arc<TtlFn>>,
    pub(crate) max_duplicate_body: u64,
    pub(crate) limits: Limits,
    pub(crate) on_outcome: OutcomeHook,
    pub(crate) grpc: GrpcMode,
    pub(crate) retry_after: Duration,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) store_status: Arc<StatusFn>,
    pub(crate) max_response_body: usize,
    pub(crate) skip_headers: Vec<HeaderName>,
    /// Request headers carried into replays, with the name they are replayed under.
    pub(crate) carried: Vec<(HeaderName, HeaderName)>,
}

/// Headers never stored whatever the configuration: cookies (a replay must never hand one
/// client's session to another), hop-by-hop headers, and the framing that the replay recomputes.
pub(crate) const ALWAYS_SKIPPED: [&str; 11] = [
    "set-cookie",
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

fn carried_pair(name: HeaderName) -> (HeaderName, HeaderName) {
    let replayed = HeaderName::try_from(format!("original-{}", name.as_str()))
        .expect("a header name prefixed with `original-` is a header name");
    (name, replayed)
}

impl Default for Config {
    fn default() -> Self {
        Self {
            header: HeaderName::from_static("idempotency-key"),
            max_key_len: 255,
            require_key: false,
            methods: vec![Method::POST, Method::PATCH],
            predicate: None,
            scope: None,
            allow_unscoped: false,
            fingerprint: Fingerprint::default(),
            timings: Timings::default(),
            ttl_fn: None,
            max_duplicate_body: 16 * 1024 * 1024,
            limits: Limits::default(),
            on_outcome: OutcomeHook::none(),
            grpc: GrpcMode::Detect,
            retry_after: Duration::from_secs(1),
            on_store_error: OnStoreError::FailClosed,
            store_status: Arc::new(|status: StatusCode| status.as_u16() < 400),
            max_response_body: 1024 * 1024,
            skip_headers: vec![http::header::DATE],
            carried: vec![carried_pair(HeaderName::from_static("x-request-id"))],
        }
    }
}

impl Config {
    /// Whether the layer handles this request at all.
    pub(crate) fn applies(&self, parts: &Parts) -> bool {
        match &self.predicate {
            Some(predicate) => predicate(parts),
            None => self.methods.contains(&parts.method),
        }
    }

    /// Whether this request is a gRPC call.
    pub(crate) fn is_grpc(&self, parts: &Parts) -> bool {
        match self.grpc {
            GrpcMode::Always => true,
            GrpcMode::Never => false,
            GrpcMode::Detect => parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| {
                    let v = v.as_bytes();
                    v.starts_with(b"application/grpc") && !v.starts_with(b"application/grpc-web")
                }),
        }
    }

    /// How long the record of this request is kept.
    pub(crate) fn ttl_for(&self, parts: &Parts) -> Duration {
        self.ttl_fn
            .as_ref()
            .and_then(|ttl| ttl(parts))
            .unwrap_or(self.timings.ttl)
    }

    /// Whether a response header is kept in the record.
    pub(crate) fn stores_header(&self, name: &HeaderName) -> bool {
        !ALWAYS_SKIPPED.contains(&name.as_str())
            && !self.skip_headers.contains(name)
            && !self.carried.iter().any(|(carried, _)| carried == name)
    }
}

/// Applies [`Idempotency`] to a service. See the [crate docs](crate) for the lifecycle and
/// the README for the table of defaults.
///
/// Setters take `self` by value; every one has a default, so `IdempotencyLayer::new()` alone
/// is a working layer on the embedded [`MemoryStore`].
#[derive(Clone)]
pub struct IdempotencyLayer<St = MemoryStore> {
    store: St,
    config: Arc<Config>,
    tracker: Arc<Tracker>,
}

impl IdempotencyLayer<MemoryStore> {
    /// A layer on a fresh [`MemoryStore`] with every default.
    pub fn new() -> Self {
        Self::with_store(MemoryStore::new())
    }
}

impl Default for IdempotencyLayer<MemoryStore> {
    fn default() -> Self {
        Self::new()
    }
}

impl<St> IdempotencyLayer<St> {
    /// A layer on `store` with every default. Clones of the layer (and of the services it
    /// makes) share the store.
    pub fn with_store(store: St) -> Self {
        Self {
            store,
            config: Arc::new(Config::default()),
            tracker: Arc::default(),
        }
    }

    fn config(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// The request header that carries the key \[`Idempotency-Key`\].
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.config().header = name;
        self
    }

    /// The longest key accepted, in characters \[255\]; longer keys get 400.
    pub fn max_key_len(mut self, max: usize) -> Self {
        self.config().max_key_len = max;
        self
    }

    /// Whether a handled request without a key gets 400 [false: it runs normally].
    pub fn require_key(mut self, required: bool) -> Self {
        self.config().require_key = required;
        self
    }

    /// The methods handled [POST, PATCH]; others pass through untouched.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config().methods = methods.into_iter().collect();
        self
    }

    /// Decides from the request head which requests are handled, replacing the method check
    /// [none: the methods decide].
    pub fn predicate(mut self, predicate: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        self.config().predicate = Some(Arc::new(predicate));
        self
    }

    /// Scopes keys, typically per tenant: the function reads the request head (usually an
    /// extension an authentication layer set) and returns the scope.
    ///
    /// A keyed request for which it returns `None` is **refused** with 500 (problem type
    /// `#missing-scope`, logged at error level): the usual cause is a layer order in which
    /// this layer runs before authentication, and letting such requests through would run
    /// every duplicate again while the app looks protected. See
    /// [`allow_unscoped`](Self::allow_unscoped) to let them through instead.
    ///
    /// [Without a scope function every client shares one key space: one client's key can
    /// replay another's response.] Run authentication before this layer.
    pub fn scope(
        mut self,
        scope: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.config().scope = Some(Arc::new(scope));
        self
    }

    /// Lets a keyed request for which the scope function returns `None` pass through
    /// **without idempotency** (logged at warn level) instead of refusing it with 500
    /// \[false\]. For routes that serve anonymous and authenticated clients alike.
    pub fn allow_unscoped(mut self, allow: bool) -> Self {
        self.config().allow_unscoped = allow;
        self
    }

    /// What feeds the request fingerprint [query string and body]. See [`Fingerprint`].
    pub fn fingerprint(mut self, fingerprint: Fingerprint) -> Self {
        self.config().fingerprint = fingerprint;
        self
    }

    /// How long a claim lasts without renewal [60 s]. It is renewed every third of this while
    /// the handler runs; only a dead process lets it lapse, blocking the key this long.
    ///
    /// # Panics
    ///
    /// Below 30 ms or above ten years.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config().timings.set_lease(lease);
        self
    }

    /// How long a completed response is kept for replay [24 h]. A key reused after this runs
    /// the request again.
    ///
    /// # Panics
    ///
    /// When zero or above ten years.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config().timings.set_ttl(ttl);
        self
    }

    /// Chooses the retention per request from its head (a route, a tenant's plan); `None`
    /// keeps the layer's [`ttl`](Self::ttl) \[none\]. Honoured by every store; values are
    /// clamped to between 1 ms and ten years.
    pub fn ttl_fn(
        mut self,
        ttl: impl Fn(&Parts) -> Option<Duration> + Send + Sync + 'static,
    ) -> Self {
        self.config().ttl_fn = Some(Arc::new(ttl));
        self
    }

    /// The longest any store call may take [5 s]; past it the request is treated as a store
    /// failure (see [`on_store_error`](Self::on_store_error)).
    ///
    /// # Panics
    ///
    /// When zero or above ten years.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config().timings.set_store_timeout(timeout);
        self
    }

    /// What a duplicate gets while the original runs [`OnConflict::Reject`]: 409.
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.config().timings.set_on_conflict(on_conflict);
        self
    }

    /// The `Retry-After` of 409 and 503 answers [1 s]. A 409 asks for no more than the
    /// original's lease still runs (at least 1 s), when the store reports it.
    ///
    /// # Panics
    ///
    /// Above ten years.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.config().retry_after = crate::protocol::checked("retry_after", after, Duration::ZERO);
        self
    }

    /// The largest body a duplicate may send to be compared with the original [16 MiB]; a
    /// larger one gets 413 (problem type `#body-too-large`) without being read further. The
    /// original's body is the handler's business: put a `RequestBodyLimitLayer` in front.
    pub fn max_duplicate_body(mut self, bytes: u64) -> Self {
        self.config().max_duplicate_body = bytes;
        self
    }

    /// The largest recovery point (phase and data) a handler may save through
    /// [`RecoveryPoints`](crate::RecoveryPoints) \[64 KiB\]; a larger save is refused with
    /// [`RecoveryError::TooLarge`](crate::RecoveryError::TooLarge), never truncated.
    pub fn max_recovery_point(mut self, bytes: usize) -> Self {
        self.config().limits.max_recovery_point = bytes;
        self
    }

    /// How many requests may run on after their clients left, and how many request-body
    /// bytes they may have declared (`Content-Length`) together [1,024 requests, 256 MiB].
    /// Past either, new keyed requests get 503 with `Retry-After` (problem type
    /// `#overloaded`) until some finish: back-pressure instead of unbounded memory.
    pub fn max_detached(mut self, requests: usize, bytes: u64) -> Self {
        let limits = &mut self.config().limits;
        limits.max_detached = requests;
        limits.max_detached_bytes = bytes;
        self
    }

    /// How many bytes of outcomes may wait for a store that failed at the moment of their
    /// completion [64 MiB]. Such a completion is retried in the background (the claim kept and
    /// renewed) until the store takes it; past this bound it is not retried, and its claim
    /// lapses with its lease (a retry after that runs again), as if the process had died.
    pub fn max_pending_completions(mut self, bytes: u64) -> Self {
        self.config().limits.max_pending_bytes = bytes;
        self
    }

    /// Which requests are gRPC calls [`GrpcMode::Detect`]: by their `content-type`. A gRPC
    /// call is stored only when it succeeded (`grpc-status: 0`), with its trailers, and the
    /// layer's own answers to it are gRPC errors. See the README's gRPC section.
    pub fn grpc(mut self, mode: GrpcMode) -> Self {
        self.config().grpc = mode;
        self
    }

    /// Called once for every request the layer sees, with what became of it (see
    /// [`Outcome`]): feed your metrics from here \[none\]. It runs on the request's task:
    /// keep it cheap (increment a counter).
    pub fn on_outcome(mut self, hook: impl Fn(Outcome) + Send + Sync + 'static) -> Self {
        self.config().on_outcome = OutcomeHook::new(hook);
        self
    }

    /// What happens when the store fails [`OnStoreError::FailClosed`]: 503.
    pub fn on_store_error(mut self, on_error: OnStoreError) -> Self {
        self.config().on_store_error = on_error;
        self
    }

    /// Which response statuses are stored \[status < 400\]. Any other answer releases the key
    /// at once, so a corrected retry with the same key runs.
    pub fn store_status(
        mut self,
        store: impl Fn(StatusCode) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.config().store_status = Arc::new(store);
        self
    }

    /// The largest response body stored [1 MiB]. Larger responses reach the client whole, but
    /// only their status and headers are kept: a duplicate gets that status with an empty body
    /// and `idempotent-body-omitted: true`, never a second execution.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.config().max_response_body = bytes;
        self
    }

    /// Response headers never stored nor replayed, **replacing** the default list \[`date`\].
    /// Whatever this list says, `set-cookie`, hop-by-hop headers and `content-length` are
    /// never stored.
    pub fn skip_response_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config().skip_headers = names.into_iter().collect();
        self
    }

    /// Request headers of the original carried into replays as `original-<name>`
    /// \[`x-request-id`\]; the replay keeps its own value of the header.
    pub fn carry_request_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config().carried = names.into_iter().map(carried_pair).collect();
        self
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    /// A handle to shut this layer down gracefully: it sees every service made by this layer
    /// and its clones. See [`DrainHandle`] and the README's shutdown section.
    pub fn drain_handle(&self) -> DrainHandle<St>
    where
        St: Clone,
    {
        DrainHandle::new(
            self.tracker.clone(),
            self.store.clone(),
            self.config.timings.store_timeout,
        )
    }
}

impl<S, St: Clone> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::from_parts(
            inner,
            self.store.clone(),
            self.config.clone(),
            self.tracker.clone(),
        )
    }
}

impl<St: fmt::Debug> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("header", &self.header)
            .field("max_key_len", &self.max_key_len)
            .field("require_key", &self.require_key)
            .field("methods", &self.methods)
            .field("predicate", &self.predicate.is_some())
            .field("scope", &self.scope.is_some())
            .field("fingerprint", &self.fingerprint)
            .field("timings", &self.timings)
            .field("retry_after", &self.retry_after)
            .field("allow_unscoped", &self.allow_unscoped)
            .field("max_duplicate_body", &self.max_duplicate_body)
            .field("limits", &self.limits)
            .field("on_outcome", &self.on_outcome)
            .field("grpc", &self.grpc)
            .field("on_store_error", &self.on_store_error)
            .field("max_response_body", &self.max_response_body)
            .field("skip_headers", &self.skip_headers)
            .field("carried", &self.carried)
            .finish_non_exhaustive()
    }
}
