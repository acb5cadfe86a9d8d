//! [`Idempotency`]: the request lifecycle, step by step.
//!
//! 1. Not handled (method or predicate) → pass through.
//! 2. Key header: none → pass through (or 400 when required); invalid or repeated → 400.
//! 3. Scope (tenant) + method + path + key → the record's composite key.
//! 4. Claim it in the store (bounded by the store timeout; on failure 503 or fail open).
//!    * completed → read out and hash the duplicate's body → replay, or 422 on a mismatch;
//!    * in flight → 409, or wait for the original and replay it;
//!    * claimed → run the handler with the body hashed as it streams, renewing the lease.
//! 5. The handler answered: a storable answer is buffered (up to the limit) and stored with
//!    its fingerprint, then returned; anything else releases the key and is returned as is.
//!
//! From step 4 on, the work runs to its end even if the client goes away (see
//! [`ResponseFuture`]). Key parsing lives in `key`, capturing the answer in `capture`, replays
//! in `replay`, and the claim itself in the transport-free `protocol` module.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use tower_service::Service;

use super::capture::{self, Captured, Produced};
use super::config::{Config, OnStoreError};
use super::fingerprint::FingerprintHasher;
use super::future::ResponseFuture;
use super::key::{self, HeldKey, KeyHeader};
use super::live;
use super::problem::{Problem, ProblemKind};
use super::replay;
use super::request_body::{self, RequestBody};
use super::response_body::ResponseBody;
use super::sse;
use crate::protocol::{
    self, Begin, CatchUnwind, ClaimGuard, Failure, FirstClaim, Outcome, OutcomeHook, Panicked,
    Refusal, ReleaseReason, Settings, Ticket,
};
use crate::store::{ClaimOutcome, MemoryStore, OwnerToken, Record, Store, StoreError};
use crate::BoxError;

/// Middleware that makes unsafe requests safe to retry. See the [crate docs](crate).
#[derive(Clone)]
pub struct Idempotency<S, St = MemoryStore> {
    inner: S,
    core: Arc<Core<St>>,
}

/// What a service shares with each of its keyed requests, behind one `Arc`: a request clones
/// that, not the store (a Redis or PostgreSQL store is several `Arc`s) and the configuration
/// one by one.
struct Core<St> {
    settings: Settings<St>,
    config: Arc<Config>,
    /// The streams this service answers while storing them, for duplicates that join.
    live: Arc<live::Registry>,
}

impl<S> Idempotency<S, MemoryStore> {
    /// Wraps `inner` with every default, on a fresh [`MemoryStore`].
    pub fn new(inner: S) -> Self {
        Self::from_parts(inner, Settings::default(), Arc::default())
    }
}

impl<S, St> Idempotency<S, St> {
    pub(crate) fn from_parts(inner: S, settings: Settings<St>, config: Arc<Config>) -> Self {
        Self {
            inner,
            core: Arc::new(Core {
                settings,
                config,
                live: Arc::default(),
            }),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug, St: fmt::Debug> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("settings", &self.core.settings)
            .field("config", &self.core.config)
            .finish()
    }
}

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S, St>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store + Clone,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let (config, settings) = (&*self.core.config, &self.core.settings);
        let (store_key, key, ticket) = match admit(config, settings, &parts) {
            Admission::Guard(store_key, key, ticket) => (store_key, key, ticket),
            Admission::Pass(outcome) => {
                settings.hook().fire(outcome);
                return self.passthrough(parts, body);
            }
            Admission::Refuse(problem, outcome) => {
                settings.hook().fire(outcome);
                return ResponseFuture::ready(problem.respond(config.is_grpc(&parts)));
            }
        };
        // Looked up only for requests the layer answers or guards: a passthrough pays no
        // `content-type` lookup.
        let (content_type, content_length) = key::content_headers(&parts.headers);
        let grpc = config.is_grpc_typed(content_type);
        let declared = content_length
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        let span = tracing::debug_span!("idempotency", key = %store_key, method = %parts.method, path = parts.uri.path());
        let hook = settings.hook().clone();
        // A store that claims without waiting (the memory store) claims here, on the caller's
        // task. A replay then needs none of the general state below: it is answered by a small
        // future of its own, small enough for the allocator's per-thread cache, which the
        // general state is not (sizes in BENCHMARKS.md).
        let first = match self.claim_now(&store_key, &span) {
            Ok(first) => first,
            Err(_panic) => {
                drop(ticket);
                hook.fire(Outcome::Released(ReleaseReason::Panic));
                let problem = Problem::Plain(ProblemKind::HandlerPanicked);
                return ResponseFuture::ready(problem.respond(grpc));
            }
        };
        let first = match first {
            (_, Some(Ok(ClaimOutcome::Completed(record)))) => {
                let hasher = config.fingerprint.start(&parts);
                let last_event_id = sse::last_event_id(&parts.headers);
                drop(parts);
                let task = Box::pin(KeyedTask {
                    run: Some(protocol::catch_unwind(replay_at_once(
                        self.core.clone(),
                        grpc,
                        record,
                        body,
                        hasher,
                        last_event_id,
                        ticket,
                    ))),
                    span,
                    hook,
                    grpc,
                });
                // Nothing to finish should its caller go away: the key is not held.
                return ResponseFuture::replay(task);
            }
            (token, claimed) => Some(FirstClaim::new(token, claimed)),
        };
        let work = Keyed {
            inner: protocol::take_ready(&mut self.inner),
            core: self.core.clone(),
            grpc,
            _body: PhantomData,
        };
        // One box for the whole keyed request, made where the work is made: the wrappers
        // (panic capture, span, outcome hook) are fields of one future beside it, so nothing
        // moves the work's state (large: it holds the request's parts and the handler's future)
        // after it is boxed, and there is no second allocation.
        let task = Box::pin(KeyedTask {
            run: Some(protocol::catch_unwind(
                work.run(store_key, key, ticket, first, parts, body),
            )),
            span,
            hook,
            grpc,
        });
        ResponseFuture::keyed(task, settings.tracker().clone(), declared)
    }
}

impl<S, St: Store> Idempotency<S, St> {
    /// [`Store::claim_now`] inside the request's span, with a token of its own; a panic in the
    /// store is caught (and answered as [`KeyedTask`] answers one).
    fn claim_now(
        &self,
        store_key: &str,
        span: &tracing::Span,
    ) -> std::thread::Result<(OwnerToken, Option<Result<ClaimOutcome, StoreError>>)> {
        let _entered = span.enter();
        let store = self.core.settings.store();
        let lease = self.core.settings.timings().lease;
        let token = OwnerToken::random();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (token, store.claim_now(store_key, &token, lease))
        }))
    }
}

/// A replay whose record the store gave at once ([`Store::claim_now`]): the duplicate's body
/// is hashed and compared, then the record is answered. `ticket` is held to its end, as the
/// general path holds it.
async fn replay_at_once<St, B, E, ReqBody>(
    core: Arc<Core<St>>,
    grpc: bool,
    record: Record,
    body: ReqBody,
    hasher: Option<FingerprintHasher>,
    last_event_id: Option<Box<HeaderValue>>,
    ticket: Ticket,
) -> (Answer<B, E>, Option<Outcome>)
where
    ReqBody: Body,
    ReqBody::Error: Into<BoxError>,
{
    let replayed = duplicate(&core.config, grpc, record, body, hasher).await;
    let (response, outcome) = resumed(replayed, last_event_id);
    drop(ticket);
    (Ok(response), Some(outcome))
}

/// A duplicate of a completed key, answered from its record under `config`: its body hashed
/// (up to the duplicate body limit) and compared, then the record replayed.
fn duplicate<'a, ReqBody, ResBody>(
    config: &'a Config,
    grpc: bool,
    record: Record,
    body: ReqBody,
    hasher: Option<FingerprintHasher>,
) -> impl Future<Output = (Response<ResponseBody<ResBody>>, Outcome)> + 'a
where
    ReqBody: Body + 'a,
    ReqBody::Error: Into<BoxError>,
{
    let body_limit = config.duplicate_body_limit();
    let answering = replay::Answering {
        carried: &config.carried,
        retry_after: config.retry_after,
        grpc,
    };
    replay::duplicate(record, body, hasher, body_limit, answering)
}

/// A duplicate's answer, resumed after its `Last-Event-ID` when it is a replay of a stored
/// event stream (see [`sse::resume`]).
fn resumed<B>(
    (response, outcome): (Response<ResponseBody<B>>, Outcome),
    last_event_id: Option<Box<HeaderValue>>,
) -> (Response<ResponseBody<B>>, Outcome) {
    match last_event_id {
        Some(id) if matches!(outcome, Outcome::Replayed) => (sse::resume(response, &id), outcome),
        _ => (response, outcome),
    }
}

pin_project_lite::pin_project! {
    /// A keyed request's work with what wraps it: polled inside its span, a panic in the
    /// layer's own code (or the store's) answered with 500 (the claim guard, dropped with the
    /// work, releases the key), and its outcome reported to the hook once it ends (by the
    /// work's pump instead, when its answer streams: `None`). Dropped
    /// unfinished, the work is dropped inside its span too, so what its guard logs then is
    /// attributed to the request.
    struct KeyedTask<F> {
        #[pin]
        run: Option<CatchUnwind<F>>,
        span: tracing::Span,
        hook: OutcomeHook,
        grpc: bool,
    }

    impl<F> PinnedDrop for KeyedTask<F> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            // A finished task dropped its work already (in `poll`): nothing to enter for.
            if this.run.is_some() {
                let _entered = this.span.enter();
                this.run.set(None);
            }
        }
    }
}

impl<F, B, E> Future for KeyedTask<F>
where
    F: Future<Output = (Answer<B, E>, Option<Outcome>)>,
{
    type Output = Answer<B, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        let run = this
            .run
            .as_mut()
            .as_pin_mut()
            .expect("KeyedTask polled after completion");
        let (answer, outcome) = match ready!(run.poll(cx)) {
            Ok(done) => done,
            Err(_panic) => (
                Ok(Problem::Plain(ProblemKind::HandlerPanicked).respond(*this.grpc)),
                Some(Outcome::Released(ReleaseReason::Panic)),
            ),
        };
        // The work's state is dropped now, inside the span, not when the box is.
        this.run.set(None);
        if let Some(outcome) = outcome {
            this.hook.fire(outcome);
        }
        Poll::Ready(answer)
    }
}

/// What the layer does with a request before any store call.
enum Admission {
    /// Guard it under this store key (built from this idempotency key).
    Guard(String, HeldKey, Ticket),
    /// Let it through untouched.
    Pass(Outcome),
    /// Answer it at once.
    Refuse(Problem, Outcome),
}

/// Steps 1 to 3: is the request handled, its key, its scope, and room for it.
fn admit<St>(config: &Config, settings: &Settings<St>, parts: &Parts) -> Admission {
    if !config.applies(parts) {
        tracing::trace!(
            outcome = "passthrough",
            reason = "not_handled",
            "request not handled"
        );
        return Admission::Pass(Outcome::Passthrough);
    }
    let key = match key::read(&parts.headers, &config.header, config.max_key_len) {
        KeyHeader::Present(key) => key,
        KeyHeader::Missing if config.require_key => {
            tracing::debug!(
                outcome = "missing_key",
                "idempotency key required but absent"
            );
            return Admission::Refuse(Problem::Plain(ProblemKind::MissingKey), Outcome::MissingKey);
        }
        KeyHeader::Missing => {
            tracing::trace!(
                outcome = "passthrough",
                reason = "no_key",
                "request without idempotency key"
            );
            return Admission::Pass(Outcome::Passthrough);
        }
        KeyHeader::Invalid(error) => {
            tracing::debug!(outcome = "invalid_key", %error, "idempotency key refused");
            return Admission::Refuse(Problem::InvalidKey(error), Outcome::InvalidKey);
        }
    };
    let scope = match &config.scope {
        None => String::new(),
        Some(scope) => match scope(parts) {
            Some(scope) => scope,
            None if config.allow_unscoped => {
                tracing::warn!(
                    outcome = "passthrough",
                    reason = "no_scope",
                    "keyed request without a scope runs WITHOUT idempotency (allow_unscoped)"
                );
                return Admission::Pass(Outcome::Passthrough);
            }
            None => {
                tracing::error!(
                    outcome = "missing_scope",
                    "the idempotency scope function returned None for a keyed request: refused \
                     with 500. Authentication must run before the idempotency layer (with \
                     axum's Router::layer, add it after the idempotency layer)"
                );
                return Admission::Refuse(
                    Problem::Plain(ProblemKind::MissingScope),
                    Outcome::MissingScope,
                );
            }
        },
    };
    let ticket = match settings.tracker().enter(settings.limits()) {
        Ok(ticket) => ticket,
        Err(refusal) => {
            let kind = match refusal {
                Refusal::Draining => ProblemKind::ShuttingDown,
                Refusal::Overloaded => ProblemKind::Overloaded,
            };
            let problem = Problem::RetryAfter(kind, config.retry_after);
            return Admission::Refuse(problem, refusal.outcome());
        }
    };
    let (store_key, key) = key::store_key_holding(&scope, &parts.method, parts.uri.path(), key);
    Admission::Guard(store_key, key, ticket)
}

impl<S, St> Idempotency<S, St> {
    fn passthrough<ReqBody, ResBody>(
        &mut self,
        parts: Parts,
        body: ReqBody,
    ) -> ResponseFuture<S::Future, ResBody, S::Error>
    where
        S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    {
        ResponseFuture::passthrough(
            self.inner
                .call(Request::from_parts(parts, RequestBody::plain(body))),
        )
    }
}

/// One keyed request: everything from the claim on.
struct Keyed<S, St, ReqBody> {
    inner: S,
    core: Arc<Core<St>>,
    /// Whether the request is a gRPC call (answered in gRPC's terms).
    grpc: bool,
    _body: PhantomData<fn(ReqBody)>,
}

type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;

impl<S, St, ReqBody, ResBody> Keyed<S, St, ReqBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    St: Store + Clone,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    /// Claims `key`, then runs the original, replays, joins its live stream, or refuses.
    ///
    /// An `async` block, not an `async fn`: an `async fn` moves each argument into a local of
    /// its own, and its state keeps both (the request's parts twice), which every keyed
    /// request would copy into its box.
    #[allow(clippy::manual_async_fn)]
    fn run(
        self,
        store_key: String,
        key: HeldKey,
        ticket: Ticket,
        first: Option<FirstClaim>,
        parts: Parts,
        body: ReqBody,
    ) -> impl Future<Output = (Answer<ResBody, S::Error>, Option<Outcome>)> {
        async move {
            let hasher = self.core.config.fingerprint.start(&parts);
            let timings = self.core.settings.timings();
            // A duplicate that may join finds its original's live stream, if one streams here
            // (looked up only when joining is on, and not for a key claimed at once).
            if timings.join && !matches!(first, Some(FirstClaim::Claimed(_))) {
                if let Some(stream) = self.core.live.get(&store_key) {
                    drop((ticket, first));
                    // Boxed: only a joining duplicate needs this state.
                    let joined = Box::pin(self.join(stream, parts, body, hasher)).await;
                    let (response, outcome) = joined;
                    return (Ok(response), Some(outcome));
                }
            }
            let ttl = self.core.config.ttl_for(&parts, timings.ttl);
            let store = self.core.settings.store();
            let mut begun = protocol::begin(store, store_key, timings, ticket, first).await;
            if let Ok(Begin::MayJoin {
                ticket,
                key: store_key,
            }) = begun
            {
                // In flight, and not streaming here: its stream in the store, if it has one.
                // Boxed: only a joining duplicate needs this state.
                let found = live::find(store, &store_key, timings, &self.core.live);
                let waited = match Box::pin(found).await {
                    Ok(live::Found::Join(stream)) => {
                        drop(ticket);
                        let joined = Box::pin(self.join(stream, parts, body, hasher)).await;
                        let (response, outcome) = joined;
                        return (Ok(response), Some(outcome));
                    }
                    Ok(live::Found::Wait(waited)) => waited,
                    Err(unreadable) => {
                        let retry_after = self.core.config.retry_after;
                        let (response, outcome) =
                            replay::unreadable_record(unreadable, retry_after, self.grpc);
                        return (Ok(response), Some(outcome));
                    }
                };
                // Nothing to join: wait as `Wait` does, for what is left of the bound.
                let waiting = protocol::Timings {
                    join: false,
                    wait: timings.wait.map(|bound| bound.saturating_sub(waited)),
                    ..*timings
                };
                begun = Box::pin(protocol::begin(store, store_key, &waiting, ticket, None)).await;
            }
            match begun {
                Ok(Begin::MayJoin { .. }) => unreachable!("begun again with joining off"),
                Ok(Begin::Claimed(guard)) => {
                    tracing::debug!(outcome = "claimed", "key claimed; running the handler");
                    self.original(guard, key, ttl, parts, body, hasher).await
                }
                Ok(Begin::Completed { record, waited }) => {
                    let last_event_id = sse::last_event_id(&parts.headers);
                    if waited {
                        tracing::debug!(
                            outcome = "waited",
                            "original finished while the duplicate waited"
                        );
                    }
                    let config = &self.core.config;
                    let replayed = duplicate(config, self.grpc, record, body, hasher).await;
                    let (response, outcome) = resumed(replayed, last_event_id);
                    (Ok(response), Some(outcome))
                }
                Ok(Begin::InFlight {
                    waited,
                    lease_remaining,
                }) => {
                    tracing::info!(
                        outcome = "conflict",
                        waited,
                        "original request still in flight"
                    );
                    let retry_after = self.core.config.retry_after;
                    let after = lease_remaining.map_or(retry_after, |remaining| {
                        remaining.clamp(Duration::from_secs(1), retry_after)
                    });
                    let problem = Problem::RetryAfter(ProblemKind::InFlight, after);
                    (Ok(problem.respond(self.grpc)), Some(Outcome::Conflict))
                }
                Err(error) => match error.unreadable() {
                    // A record that exists but cannot be read proves the key was used: never a
                    // reason to run the handler, whatever the store-error policy (`begin` logged it).
                    Some(unreadable) => {
                        let (response, outcome) = replay::unreadable_record(
                            unreadable,
                            self.core.config.retry_after,
                            self.grpc,
                        );
                        (Ok(response), Some(outcome))
                    }
                    // Boxed: a rare path (failing open runs the handler) that every request's
                    // state would otherwise carry.
                    None => (
                        Box::pin(self.store_failed(error, parts, body)).await,
                        Some(Outcome::StoreError),
                    ),
                },
            }
        }
    }

    /// A duplicate joining its original's live stream: its payload compared with the
    /// original's, then the stream (see [`live::join`]).
    async fn join(
        self,
        stream: Arc<live::Live>,
        parts: Parts,
        body: ReqBody,
        hasher: Option<FingerprintHasher>,
    ) -> (Response<ResponseBody<ResBody>>, Outcome) {
        let config = &self.core.config;
        let last_event_id = sse::last_event_id(&parts.headers);
        drop(parts);
        let body_limit = config.duplicate_body_limit();
        let fingerprint = stream.fingerprint();
        if let Some(refusal) =
            replay::refused(fingerprint, body, hasher, body_limit, self.grpc).await
        {
            return refusal;
        }
        (live::join(stream, last_event_id), Outcome::Replayed)
    }

    async fn store_failed(
        mut self,
        error: Failure,
        mut parts: Parts,
        body: ReqBody,
    ) -> Answer<ResBody, S::Error> {
        let config = &self.core.config;
        match config.on_store_error {
            OnStoreError::FailClosed => {
                tracing::error!(outcome = "store_error", %error, "store unavailable; failing closed");
                let problem =
                    Problem::RetryAfter(ProblemKind::StoreUnavailable, config.retry_after);
                Ok(problem.respond(self.grpc))
            }
            OnStoreError::FailOpen => {
                tracing::warn!(outcome = "store_error", %error, "store unavailable; running without idempotency");
                // The store key (which holds the key) went with the failed claim: the key is
                // read again from the head, where admission found it.
                if let Some(key) = key::key_of(&parts.headers, &config.header, config.max_key_len) {
                    parts.extensions.insert(key);
                }
                let request = Request::from_parts(parts, RequestBody::plain(body));
                Ok(self.inner.call(request).await?.map(ResponseBody::inner))
            }
        }
    }

    /// The first request with this key: run it under the claim, then store or release. (An
    /// `async` block for the reason given at [`run`](Self::run).)
    #[allow(clippy::manual_async_fn)]
    fn original(
        self,
        guard: ClaimGuard<St>,
        key: HeldKey,
        ttl: Duration,
        mut parts: Parts,
        body: ReqBody,
        hasher: Option<FingerprintHasher>,
    ) -> impl Future<Output = (Answer<ResBody, S::Error>, Option<Outcome>)> {
        async move {
            let Keyed {
                mut inner,
                core,
                grpc,
                ..
            } = self;
            let config = &*core.config;
            let carried = capture::carried_headers(&parts, &config.carried);
            let (body, mut fingerprint) =
                request_body::attach(body, hasher, config.fingerprint.covers_body());
            // The handler reaches its key and the key's recovery points from its request's
            // extensions (put there only now: a replay never builds the extensions map). The
            // points are bound to this request's fingerprint.
            let points = guard.recovery_points(
                ttl,
                core.settings.limits().max_recovery_point,
                fingerprint.for_points(),
            );
            parts.extensions.insert(key.into_key(guard.key()));
            parts.extensions.insert(points.clone());
            let call = inner.call(Request::from_parts(parts, body));
            // Pinned here and passed by reference: each wrapper (panic capture, lease renewal)
            // would otherwise hold its own copy of this future in its state.
            let work = std::pin::pin!(async {
                let response = call.await?;
                let max_body = config.max_stored_body;
                // After a failed save, the answer is kept whatever it is (its status, a
                // `no-store`, a failed gRPC call): releasing the key would let a retry repeat a
                // side effect recorded nowhere.
                let (keep, stream) = if points.unsaved() {
                    (capture::Keep::Any, false)
                } else {
                    (capture::Keep::Storable(&*config.store_status), !grpc)
                };
                Ok(capture::read(response, keep, max_body, grpc, stream).await)
            });
            let produced = guard.run(work).await;
            if points.unsaved() && !points.checked() {
                // A save failed before the key's point was checked (an unread body, a store
                // error): the body is whole now, so check it before keeping this answer.
                let finished = fingerprint.finish(&guard).await;
                points.verify(finished).await;
            }
            if points.reused() {
                // The key's point belongs to a request with another payload: whatever the
                // handler made of the refusal, this request is refused and the point kept.
                drop(produced);
                guard.release().await;
                let answer = Problem::Plain(ProblemKind::KeyReused).respond(grpc);
                return (Ok(answer), Some(Outcome::Mismatch));
            }
            let produced = match produced {
                Ok(Ok(Produced::Streaming(captured))) => {
                    let fingerprint = fingerprint.finish(&guard).await;
                    // Stored instead of releasing the key should the body fail after a save of
                    // the run's recovery point failed (see `unsaved_failure`).
                    let problem = Problem::Plain(ProblemKind::ProgressUnsaved).respond(grpc);
                    let unsaved = record_of_full::<ResBody>(problem, fingerprint, &carried, config);
                    let storing = live::Storing {
                        fingerprint,
                        points: points.clone(),
                        unsaved,
                        carried,
                        config: core.config.clone(),
                        ttl,
                        registry: core.live.clone(),
                        hook: core.settings.hook().clone(),
                    };
                    // The pump reports the outcome once the stream ends.
                    return (Ok(live::start(guard, captured, storing)), None);
                }
                other => other,
            };
            let mut captured = match storable(produced, grpc) {
                ControlFlow::Continue(captured) => captured,
                ControlFlow::Break((answer, _)) if points.unsaved() => {
                    let fingerprint = fingerprint.finish(&guard).await;
                    let (answer, outcome) =
                        unsaved_failure(guard, answer, fingerprint, &carried, config, ttl, grpc)
                            .await;
                    return (answer, Some(outcome));
                }
                ControlFlow::Break((answer, reason)) => {
                    guard.release().await;
                    return (answer, Some(Outcome::Released(reason)));
                }
            };
            let fingerprint = fingerprint.finish(&guard).await;
            let record = captured.record(fingerprint, &carried, |name| config.stores_header(name));
            let outcome = guard.complete_for(record, ttl).await.into();
            let response = Response::from_parts(
                captured.head,
                ResponseBody::prefixed(captured.frames, captured.rest),
            );
            (Ok(response), Some(outcome))
        }
    }
}

/// A run whose recovery point was not saved failed (a panic, an error of the inner service, a
/// body that failed): its side effect may be recorded nowhere, so instead of releasing the key
/// it stores 500 `#progress-unsaved`, which every retry replays.
async fn unsaved_failure<St: Store, B, E>(
    guard: ClaimGuard<St>,
    answer: Answer<B, E>,
    fingerprint: Option<u128>,
    carried: &[(http::HeaderName, http::HeaderValue)],
    config: &Config,
    ttl: Duration,
    grpc: bool,
) -> (Answer<B, E>, Outcome) {
    tracing::error!(
        outcome = "stored",
        "a recovery point was not saved and the handler failed; storing 500 #progress-unsaved instead of releasing the key"
    );
    let problem = Problem::Plain(ProblemKind::ProgressUnsaved);
    let stored: Response<ResponseBody<B>> = problem.clone().respond(grpc);
    let record = record_of_full(stored, fingerprint, carried, config);
    let outcome = guard.complete_for(record, ttl).await.into();
    let answer = match answer {
        Ok(_) => Ok(problem.respond(grpc)),
        Err(error) => Err(error),
    };
    (answer, outcome)
}

/// The record of an answer the layer made itself (its body is whole in memory).
fn record_of_full<B>(
    response: Response<ResponseBody<B>>,
    fingerprint: Option<u128>,
    carried: &[(http::HeaderName, http::HeaderValue)],
    config: &Config,
) -> crate::store::Record {
    let (head, body) = response.into_parts();
    let (data, trailers) = body.into_full();
    let frames = data.into_iter().collect::<Vec<_>>();
    super::record::record(
        fingerprint,
        head.status,
        &head.headers,
        |name| config.stores_header(name),
        carried,
        Some(frames.iter()),
        trailers.as_ref(),
    )
}

/// The captured answer when it is to be stored; otherwise the answer to give while the key is
/// released, and why (logged).
fn storable<B, E>(
    produced: Result<Result<Produced<B>, E>, Panicked>,
    grpc: bool,
) -> ControlFlow<(Answer<B, E>, ReleaseReason), Captured<B>> {
    ControlFlow::Break(match produced {
        Ok(Ok(Produced::Storable(captured))) => return ControlFlow::Continue(captured),
        // Handled before (`Keyed::original`); read as a body that cannot be stored whole.
        Ok(Ok(Produced::Streaming(captured))) => {
            let body = ResponseBody::prefixed(captured.frames, captured.rest);
            (
                Ok(Response::from_parts(captured.head, body)),
                ReleaseReason::TooLarge,
            )
        }
        Ok(Ok(Produced::Unstored(response, reason))) => {
            tracing::info!(
                outcome = "not_stored",
                reason = reason.as_str(),
                status = response.status().as_u16(),
                "response not stored; releasing the key"
            );
            (Ok(response), reason)
        }
        Ok(Ok(Produced::Failed(error))) => {
            tracing::error!(outcome = "not_stored", reason = "body_error", %error, "response body failed; releasing the key");
            (
                Ok(Problem::Plain(ProblemKind::ResponseFailed).respond(grpc)),
                ReleaseReason::BodyError,
            )
        }
        Ok(Err(error)) => {
            tracing::info!(
                outcome = "not_stored",
                reason = "service_error",
                "inner service failed; releasing the key"
            );
            (Err(error), ReleaseReason::Error)
        }
        Err(_panic) => (
            Ok(Problem::Plain(ProblemKind::HandlerPanicked).respond(grpc)),
            ReleaseReason::Panic,
        ),
    })
}
