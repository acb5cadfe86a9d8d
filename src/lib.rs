//! Tower middleware that makes unsafe HTTP requests safe to retry.
//!
//! A client sends `Idempotency-Key: <key>` with a `POST`. The layer claims the key atomically,
//! runs the handler **once**, stores its response with a fingerprint of the request, and
//! answers every retry with that stored response (`idempotent-replayed: true`) instead of
//! running the handler again.
//!
//! ```
//! use axum::{routing::post, Router};
//! use tower_idempotency::IdempotencyLayer;
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(|| async { "charged" }))
//!     .layer(IdempotencyLayer::new());
//! # let _ = app;
//! ```
//!
//! # A map of the crate
//!
//! Each part has a guide in the repository's `docs/` folder (the crate is not published, so
//! read them in a checkout); the README links them all, and its configuration table lists
//! every knob.
//!
//! | part | what it is | feature | guide |
//! |---|---|---|---|
//! | [`IdempotencyLayer`] | the HTTP layer: claims the key, runs the handler once, stores and replays its response; every answer it gives itself is a [`problem`] document | – | `docs/lifecycle.md`, `docs/failures.md`, `docs/axum.md` |
//! | [`Settings`] | what every adapter shares: the store, lease, TTL, store timeout, conflicts, bounds, the [`Outcome`] hook (metrics) | – | `docs/operations.md` |
//! | [`store::MemoryStore`] | the default store: one process, bounded by bytes | – | `docs/stores.md` |
//! | [`store::SqliteStore`] | one host: an embedded SQLite file that survives restarts (SQLite bundled) | `sqlite` | `docs/stores.md` |
//! | [`store::RedisStore`] | a fleet sharing Redis (or Valkey): one server, Redis Cluster, or Sentinel that follows failovers | `redis` | `docs/stores.md` |
//! | [`store::PostgresStore`] | records in PostgreSQL, beside the business data | `postgres` | `docs/stores.md` |
//! | [`Store`](store::Store), [`store::conformance`] | the protocol a store implements, and the test suite a store of your own must pass | `conformance` for the suite | `docs/stores.md` |
//! | [`RecoveryPoints`] | a handler saves its progress under its key, so a retry after a crash resumes instead of repeating a side effect | – | `docs/recovery-points.md` |
//! | [`DrainHandle`] | graceful shutdown for rolling deploys | – | `docs/shutdown.md` |
//! | [`GrpcMode`], [`IdempotencyLayer::grpc`] | unary gRPC calls (tonic) guarded and answered in gRPC's terms | – | `docs/grpc.md` |
//! | streamed answers (server-sent events) | stored up to the body bound, replayed after a client cut, resumed from `Last-Event-ID` | – | `docs/streaming.md` |
//! | the layer over hyper or any tower service | any `Service<http::Request<B>>` | – | `docs/hyper.md` |
//! | [`client::IdempotentRetryLayer`] | the client side: stamps keys on outgoing requests, retries with jittered backoff | `client` | `docs/client.md` |
//! | [`consumer::IdempotentConsumerLayer`] | the same guarantee for message handlers (Redis Streams, Kafka, NATS, RabbitMQ) | `consumer` | `docs/consumers.md` |
//! | [`admin`] | operator tools: find, inspect and delete what the store holds for a request | – | `docs/stores.md` |
//!
//! The default build has the layer and the memory store; each feature adds the items named
//! above. To read every item locally:
//! `cargo doc --open --features redis,postgres,sqlite,client,consumer,conformance`. How the
//! crate is tested, fuzzed and measured: `docs/development.md`.
//!
//! # The lifecycle
//!
//! | the request | what happens | answer |
//! |---|---|---|
//! | method not handled [handled: POST, PATCH], or no key (and keys not required) | passes through untouched | the handler's |
//! | key required and absent; key empty, too long \[255\], not visible ASCII, a broken quoted string, or sent twice | refused; the handler does not run | 400 |
//! | first request with this key | key claimed with a lease [[`defaults::LEASE`]] renewed while the handler runs; body hashed as it streams | the handler's |
//! | … whose answer is storable [status < 400, no `Cache-Control: no-store`, no [`NoStore`] extension] | stored for the TTL [[`defaults::TTL`]] | the handler's |
//! | … whose answer is not storable, or whose handler failed | key released: a corrected retry runs | the handler's (500 after a panic) |
//! | duplicate, original done, same payload | stored response replayed, `idempotent-replayed: true`, `original-x-request-id` | the stored one |
//! | duplicate, original done, other payload (body or query) | refused | 422 |
//! | duplicate, original still running | refused with `Retry-After` [or waits for the original, then replays] | 409 |
//! | the store fails or is slower than the timeout [[`defaults::STORE_TIMEOUT`]] | refused with `Retry-After`, handler not run [or fail open] | 503 |
//! | the stored record is damaged / from a newer release | refused, handler not run (under any store-error policy) | 500 / 503 with `Retry-After` |
//!
//! Every answer the layer makes itself is an RFC 9457 problem document; see [`problem`].
//!
//! # Scoping keys (read this)
//!
//! Records are found by **scope + method + path + key**. Without a [scope
//! function](IdempotencyLayer::scope) every client shares one key space, and a client that
//! guesses or reuses another's key gets *that client's* response. Put authentication **before**
//! this layer (outer), and scope by the identity it established:
//!
//! ```
//! use axum::{routing::post, Router};
//! use tower_idempotency::IdempotencyLayer;
//!
//! #[derive(Clone)]
//! struct Tenant(String); // set by your authentication layer
//!
//! let idempotency = IdempotencyLayer::new()
//!     .scope(|parts| parts.extensions.get::<Tenant>().map(|t| t.0.clone()));
//! let app: Router = Router::new()
//!     .route("/payments", post(|| async { "charged" }))
//!     .layer(idempotency);
//!     // .layer(your_authentication_layer)  <- added after, so it runs first
//! # let _ = app;
//! ```
//!
//! A keyed request for which the scope function returns `None` is **refused** with 500
//! `#missing-scope` and the handler does not run (authentication did not run first); only with
//! [`allow_unscoped(true)`](IdempotencyLayer::allow_unscoped) does it pass through without
//! idempotency (logged at warn).
//!
//! # Guarantees and their limits
//!
//! * Two requests with the same key never both run the handler while a claim or record holds
//!   the key: the claim is one atomic store operation.
//! * Once a request holds its key, the handler runs to its end even if the client disconnects:
//!   the retry replays the stored outcome (see [`ResponseFuture`]).
//! * A response body over the limit [[`defaults::MAX_STORED_BODY`]] reaches the client whole, but only its status and
//!   headers are stored: a duplicate gets that status, an empty body and
//!   `idempotent-body-omitted: true`, never a second execution.
//! * `Set-Cookie`, `Date`, hop-by-hop headers and `Content-Length` are never stored.
//! * A record lives for the TTL; a key reused after it expired (or, in the memory store, after
//!   capacity pressure evicted it) runs the request again.
//! * A process that dies mid-request blocks its key until the lease lapses; then a retry runs.
//!   A process that stops gracefully drains first ([`DrainHandle`]): running requests finish
//!   and are stored, claims still held at the deadline are released.
//!
//! # Cancellation and panics: one rule for every adapter
//!
//! The HTTP layer and the message-consumer adapter (module `consumer`, feature `consumer`) drive the
//! store through one claim guard, so they behave alike once a key is claimed:
//!
//! | event | HTTP | consumer |
//! |---|---|---|
//! | the caller drops the future (client gone, a timeout, the loop moved on) | the handler runs to its end in the background and its outcome is stored or the key released; a retry replays it | the same; a redelivery is a `Duplicate` |
//! | the handler panics | the key is released; 500 problem | the key is released; `Err(ConsumerError::Panicked)` |
//! | the claim is dropped without an outcome (a runtime shutting down) | the key is released in the background, never left to lapse | the same |
//!
//! # Plain tower / hyper
//!
//! The layer wraps any `Service<http::Request<B>>` whose response body yields `Bytes`:
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_idempotency::{IdempotencyLayer, RequestBody};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut service = ServiceBuilder::new()
//!     .layer(IdempotencyLayer::new())
//!     .service(service_fn(|_req: Request<RequestBody<Full<Bytes>>>| async {
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("created"))))
//!     }));
//!
//! let request = || {
//!     Request::post("/orders")
//!         .header("idempotency-key", "order-1")
//!         .body(Full::new(Bytes::from("{}")))
//!         .unwrap()
//! };
//! let first = service.ready().await.unwrap().call(request()).await.unwrap();
//! assert!(first.headers().get("idempotent-replayed").is_none());
//! let retry = service.ready().await.unwrap().call(request()).await.unwrap();
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(retry.into_body().collect().await.unwrap().to_bytes(), "created");
//! # }
//! ```
//!
//! # Stores
//!
//! [`MemoryStore`](store::MemoryStore) is the default (one process). Any [`Store`](store::Store)
//! plugs in with [`IdempotencyLayer::with_store`]: the stores of this crate (SQLite, Redis,
//! PostgreSQL: see the map above) or your own; see the [`store`] module for the protocol and
//! for writing one.
//!
//! # Settings
//!
//! What the HTTP layer and the consumer layer share (the store, lease, TTL, store timeout,
//! conflicts, bounds on detached work, the outcome hook and the drain) is one [`Settings`],
//! given to `with_settings`; each layer's own setters cover the rest. Every default is a
//! constant in [`defaults`].

#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

#[doc(hidden)]
pub mod __fuzz {
    //! Not public API: entry points for this crate's fuzz targets.
    include!("fuzz.rs");
}
pub mod admin;
pub mod defaults;
mod http;
mod protocol;
pub mod store;

#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
#[cfg(feature = "consumer")]
#[cfg_attr(docsrs, doc(cfg(feature = "consumer")))]
pub mod consumer;

#[doc(hidden)]
pub use self::http::bench as __bench;
pub use self::http::{fingerprint, problem};
pub use self::http::{
    Fingerprint, FingerprintHasher, GrpcMode, Idempotency, IdempotencyKey, IdempotencyLayer,
    KeyError, NoStore, OnStoreError, RequestBody, ResponseBody, ResponseFuture,
    BODY_OMITTED_HEADER, REPLAYED_HEADER,
};
pub use protocol::{
    DrainHandle, DrainReport, OnConflict, Outcome, RecoveryError, RecoveryPoints, ReleaseReason,
    Settings,
};
pub use store::RecoveryPoint;

/// A boxed error: body errors, and the sources of store errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

// Compiles the README's and the guides' examples as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(doctest)]
mod guides {
    #[doc = include_str!("../docs/lifecycle.md")]
    struct Lifecycle;
    #[doc = include_str!("../docs/failures.md")]
    struct Failures;
    #[doc = include_str!("../docs/stores.md")]
    struct Stores;
    #[doc = include_str!("../docs/recovery-points.md")]
    struct RecoveryPoints;
    #[doc = include_str!("../docs/shutdown.md")]
    struct Shutdown;
    #[doc = include_str!("../docs/axum.md")]
    struct Axum;
    #[doc = include_str!("../docs/hyper.md")]
    struct Hyper;
    #[doc = include_str!("../docs/grpc.md")]
    struct Grpc;
    #[doc = include_str!("../docs/streaming.md")]
    struct Streaming;
    #[doc = include_str!("../docs/client.md")]
    struct Client;
    #[doc = include_str!("../docs/consumers.md")]
    struct Consumers;
    #[doc = include_str!("../docs/operations.md")]
    struct Operations;
    #[doc = include_str!("../docs/development.md")]
    struct Development;
}
