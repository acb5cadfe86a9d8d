//! The HTTP adapter's own settings: the key header, which requests are handled, their scope,
//! and what is stored of a response. What the adapters share (store, timings, limits, hook,
//! drain) is in [`Settings`](crate::Settings).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, Method, StatusCode};

use super::fingerprint::Fingerprint;
use crate::defaults;

pub(crate) type PredicateFn = dyn Fn(&Parts) -> bool + Send + Sync;
pub(crate) type ScopeFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;
pub(crate) type StatusFn = dyn Fn(StatusCode) -> bool + Send + Sync;
pub(crate) type TtlFn = dyn Fn(&Parts) -> Option<Duration> + Send + Sync;

/// What a request gets when the store fails or is slower than the store timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnStoreError {
    /// Answer 503 with `Retry-After`; the handler does not run (the default).
    FailClosed,
    /// Run the handler without idempotency and log a warning.
    FailOpen,
}

/// Which requests are gRPC calls, answered in gRPC's terms. See the guide `docs/grpc.md`.
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

/// The HTTP adapter's own settings, shared by every clone of the service.
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
    pub(crate) ttl_fn: Option<Arc<TtlFn>>,
    pub(crate) max_duplicate_body: u64,
    pub(crate) grpc: GrpcMode,
    pub(crate) retry_after: Duration,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) store_status: Arc<StatusFn>,
    pub(crate) max_stored_body: usize,
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

pub(crate) fn carried_pair(name: HeaderName) -> (HeaderName, HeaderName) {
    let replayed = HeaderName::try_from(format!("original-{}", name.as_str()))
        .expect("a header name prefixed with `original-` is a header name");
    (name, replayed)
}

impl Default for Config {
    fn default() -> Self {
        Self {
            header: HeaderName::from_static("idempotency-key"),
            max_key_len: defaults::MAX_KEY_LEN,
            require_key: false,
            methods: vec![Method::POST, Method::PATCH],
            predicate: None,
            scope: None,
            allow_unscoped: false,
            fingerprint: Fingerprint::default(),
            ttl_fn: None,
            max_duplicate_body: defaults::MAX_DUPLICATE_BODY,
            grpc: GrpcMode::Detect,
            retry_after: defaults::RETRY_AFTER,
            on_store_error: OnStoreError::FailClosed,
            store_status: Arc::new(|status: StatusCode| status.as_u16() < 400),
            max_stored_body: defaults::MAX_STORED_BODY,
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
        self.is_grpc_typed(parts.headers.get(http::header::CONTENT_TYPE))
    }

    /// Whether a request with this `content-type` is a gRPC call.
    pub(crate) fn is_grpc_typed(&self, content_type: Option<&http::HeaderValue>) -> bool {
        match self.grpc {
            GrpcMode::Always => true,
            GrpcMode::Never => false,
            GrpcMode::Detect => content_type.is_some_and(|v| {
                let v = v.as_bytes();
                v.starts_with(b"application/grpc") && !v.starts_with(b"application/grpc-web")
            }),
        }
    }

    /// How long the record of this request is kept: the TTL function's choice, else `ttl`.
    pub(crate) fn ttl_for(&self, parts: &Parts, ttl: Duration) -> Duration {
        self.ttl_fn
            .as_ref()
            .and_then(|ttl_fn| ttl_fn(parts))
            .unwrap_or(ttl)
    }

    /// How much of a duplicate's body is read to compare its fingerprint with the original's:
    /// `None` when the fingerprint does not cover the body (nothing to read).
    pub(crate) fn duplicate_body_limit(&self) -> Option<u64> {
        self.fingerprint
            .covers_body()
            .then_some(self.max_duplicate_body)
    }

    /// Whether a response header is kept in the record.
    pub(crate) fn stores_header(&self, name: &HeaderName) -> bool {
        !ALWAYS_SKIPPED.contains(&name.as_str())
            && !self.skip_headers.contains(name)
            && !self.carried.iter().any(|(carried, _)| carried == name)
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
            .field("retry_after", &self.retry_after)
            .field("allow_unscoped", &self.allow_unscoped)
            .field("max_duplicate_body", &self.max_duplicate_body)
            .field("grpc", &self.grpc)
            .field("on_store_error", &self.on_store_error)
            .field("max_stored_body", &self.max_stored_body)
            .field("skip_headers", &self.skip_headers)
            .field("carried", &self.carried)
            .finish_non_exhaustive()
    }
}
