//! [`IdempotencyLayer`]: the HTTP adapter's own knobs, each with its default, over the shared
//! [`Settings`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, Method, StatusCode};
use tower_layer::Layer;

use super::config::{carried_pair, Config, GrpcMode, OnStoreError};
use super::fingerprint::Fingerprint;
use super::service::Idempotency;
use crate::protocol::Settings;
use crate::store::MemoryStore;

/// Applies [`Idempotency`] to a service. See the [crate docs](crate) for the lifecycle and
/// the README's configuration table for every knob; each default is a constant in
/// [`defaults`](crate::defaults).
///
/// What every adapter shares (the store, lease, TTL, store timeout, conflicts, detached-work
/// bounds, outcome hook and drain) is set on [`Settings`] and given to
/// [`with_settings`](Self::with_settings); the setters here are the HTTP adapter's own.
/// Setters take `self` by value; every one has a default, so `IdempotencyLayer::new()` alone
/// is a working layer on the embedded [`MemoryStore`].
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, Settings};
/// use tower_idempotency::store::MemoryStore;
///
/// let layer = IdempotencyLayer::with_settings(
///     Settings::new(MemoryStore::new()).lease(Duration::from_secs(30)),
/// )
/// .require_key(true);
/// let drain = layer.settings().drain_handle();
/// # let _ = drain;
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer<St = MemoryStore> {
    settings: Settings<St>,
    config: Arc<Config>,
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
    /// A layer on `store` with every default: `with_settings(Settings::new(store))`. Clones
    /// of the layer (and of the services it makes) share the store.
    pub fn with_store(store: St) -> Self {
        Self::with_settings(Settings::new(store))
    }

    /// A layer on `settings` (the store and what every adapter shares), with the HTTP
    /// adapter's own defaults.
    pub fn with_settings(settings: Settings<St>) -> Self {
        Self {
            settings,
            config: Arc::new(Config::default()),
        }
    }

    /// The shared settings: the store, and the [drain handle](Settings::drain_handle) that
    /// sees every service made by this layer and its clones.
    pub fn settings(&self) -> &Settings<St> {
        &self.settings
    }

    fn config(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// The request header that carries the key \[`Idempotency-Key`\].
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.config().header = name;
        self
    }

    /// The longest key accepted, in characters
    /// \[[`defaults::MAX_KEY_LEN`](crate::defaults::MAX_KEY_LEN)\]; longer keys get 400.
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

    /// Chooses the retention per request from its head (a route, a tenant's plan); `None`
    /// keeps the settings' [`ttl`](Settings::ttl) \[none\]. Honoured by every store; values are
    /// clamped to between 1 ms and ten years.
    pub fn ttl_fn(
        mut self,
        ttl: impl Fn(&Parts) -> Option<Duration> + Send + Sync + 'static,
    ) -> Self {
        self.config().ttl_fn = Some(Arc::new(ttl));
        self
    }

    /// The `Retry-After` of 409 and 503 answers
    /// \[[`defaults::RETRY_AFTER`](crate::defaults::RETRY_AFTER)\]. A 409 asks for no more than the
    /// original's lease still runs (at least 1 s), when the store reports it.
    ///
    /// # Panics
    ///
    /// Above ten years.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.config().retry_after = crate::protocol::checked("retry_after", after, Duration::ZERO);
        self
    }

    /// The largest body a duplicate may send to be compared with the original
    /// \[[`defaults::MAX_DUPLICATE_BODY`](crate::defaults::MAX_DUPLICATE_BODY)\]; a
    /// larger one gets 413 (problem type `#body-too-large`) without being read further. The
    /// original's body is the handler's business: put a `RequestBodyLimitLayer` in front.
    pub fn max_duplicate_body(mut self, bytes: u64) -> Self {
        self.config().max_duplicate_body = bytes;
        self
    }

    /// Which requests are gRPC calls [`GrpcMode::Detect`]: by their `content-type`. A gRPC
    /// call is stored only when it succeeded (`grpc-status: 0`), with its trailers, and the
    /// layer's own answers to it are gRPC errors. See the guide `docs/grpc.md`.
    pub fn grpc(mut self, mode: GrpcMode) -> Self {
        self.config().grpc = mode;
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

    /// The largest response body stored
    /// \[[`defaults::MAX_STORED_BODY`](crate::defaults::MAX_STORED_BODY): 8 MiB\]. A larger
    /// response reaches the client whole, but only its status and headers are kept: a
    /// duplicate gets that status with an empty body and `idempotent-body-omitted: true` (a
    /// gRPC call: an error status), never a second execution. What is held of a body being
    /// stored counts against this bound (and the memory store's capacity), not the whole body
    /// before its first byte is sent: see `docs/streaming.md`.
    pub fn max_stored_body(mut self, bytes: usize) -> Self {
        self.config().max_stored_body = bytes;
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
}

impl<S> Idempotency<S, MemoryStore> {
    /// A layer with every default; see [`IdempotencyLayer`].
    pub fn layer() -> IdempotencyLayer<MemoryStore> {
        IdempotencyLayer::new()
    }
}

impl<S, St: Clone> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::from_parts(inner, self.settings.clone(), self.config.clone())
    }
}

impl<St: fmt::Debug> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("settings", &self.settings)
            .field("config", &self.config)
            .finish()
    }
}
