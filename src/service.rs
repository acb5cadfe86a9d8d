//! [`Idempotency`]: the request lifecycle, step by step.
//!
//! 1. Not handled (method or predicate) → pass through.
//! 2. Key header: none → pass through (or 400 when required); invalid or repeated → 400.
//! 3. Scope (tenant) + method + path + key → the record's composite key.
//! 4. Claim it in the store (bounded by the store timeout; on failure 503 or fail open).
//!    * completed → drain and hash the duplicate's body → replay, or 422 on a mismatch;
//!    * in flight → 409, or wait for the original and replay it;
//!    * claimed → run the handler with the body hashed as it streams, renewing the lease.
//! 5. The handler answered: a storable answer is buffered (up to the limit) and stored with
//!    its fingerprint, then returned; anything else releases the key and is returned as is.
//!
//! From step 4 on, the work runs to its end even if the client goes away (see
//! [`ResponseFuture`]).

use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderName, Request, Response};
use http_body::{Body, Frame};
use tower_service::Service;
use tracing::Instrument;

use crate::body::ResponseBody;
use crate::claim::{self, Begin, CatchUnwind, Failure};
use crate::fingerprint::{self, FingerprintHasher, RequestBody, SlotState};
use crate::future::ResponseFuture;
use crate::key::{IdempotencyKey, KeyError};
use crate::layer::{Config, IdempotencyLayer, OnStoreError};
use crate::problem::Problem;
use crate::record;
use crate::store::{MemoryStore, OwnerToken, Record, Store};
use crate::BoxError;

/// Marks a response that must not be stored: put it in the response's extensions. The key is
/// released, as for `Cache-Control: no-store`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoStore;

/// The header every replay carries (`idempotent-replayed: true`).
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The header a replay carries when the original body was too large to keep.
pub const BODY_OMITTED_HEADER: HeaderName = HeaderName::from_static("idempotent-body-omitted");

/// Middleware that makes unsafe requests safe to retry. See the [crate docs](crate).
#[derive(Clone)]
pub struct Idempotency<S, St = MemoryStore> {
    inner: S,
    store: St,
    config: Arc<Config>,
}

impl<S> Idempotency<S, MemoryStore> {
    /// Wraps `inner` with every default, on a fresh [`MemoryStore`].
    pub fn new(inner: S) -> Self {
        Self::from_parts(inner, MemoryStore::new(), Arc::default())
    }

    /// A layer with every default; see [`IdempotencyLayer`].
    pub fn layer() -> IdempotencyLayer<MemoryStore> {
        IdempotencyLayer::new()
    }
}

impl<S, St> Idempotency<S, St> {
    pub(crate) fn from_parts(inner: S, store: St, config: Arc<Config>) -> Self {
        Self {
            inner,
            store,
            config,
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
            .field("store", &self.store)
            .field("config", &self.config)
            .finish()
    }
}

/// What the header says.
enum KeyHeader {
    Missing,
    Present(IdempotencyKey),
    Invalid(KeyError),
}

fn read_key(parts: &Parts, config: &Config) -> KeyHeader {
    let mut values = parts.headers.get_all(&config.header).iter();
    let Some(value) = values.next() else {
        return KeyHeader::Missing;
    };
    if values.next().is_some() {
        return KeyHeader::Invalid(KeyError::Multiple);
    }
    match IdempotencyKey::parse(value.as_bytes(), config.max_key_len) {
        Ok(key) => KeyHeader::Present(key),
        Err(error) => KeyHeader::Invalid(error),
    }
}

fn key_problem(error: &KeyError) -> Problem {
    Problem::InvalidKey(match error {
        KeyError::Empty => "The Idempotency-Key header is empty.",
        KeyError::TooLong { .. } => "The Idempotency-Key header is longer than allowed.",
        KeyError::InvalidCharacter => {
            "The Idempotency-Key header may only contain visible ASCII characters."
        }
        KeyError::MalformedQuotedString => {
            "The Idempotency-Key header is not a valid quoted string."
        }
        KeyError::Multiple => "The request carries more than one Idempotency-Key header.",
    })
}

/// The record's key: scope, method, path and idempotency key, length-prefixed where a field
/// could contain the separator, so two different tuples never make the same string.
fn composite_key(scope: &str, parts: &Parts, key: &IdempotencyKey) -> String {
    let method = parts.method.as_str();
    let path = parts.uri.path();
    let mut out =
        String::with_capacity(scope.len() + method.len() + path.len() + key.as_str().len() + 24);
    for field in [scope, method, path] {
        push_decimal(&mut out, field.len());
        out.push(':');
        out.push_str(field);
        out.push('|');
    }
    out.push_str(key.as_str());
    out
}

fn push_decimal(out: &mut String, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[at..]).expect("ASCII digits"));
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
        let config = &self.config;
        if !config.applies(&parts) {
            tracing::trace!(
                outcome = "passthrough",
                reason = "not_handled",
                "request not handled"
            );
            return self.passthrough(parts, body);
        }
        let key = match read_key(&parts, config) {
            KeyHeader::Present(key) => key,
            KeyHeader::Missing if config.require_key => {
                tracing::debug!(
                    outcome = "missing_key",
                    "idempotency key required but absent"
                );
                return ResponseFuture::ready(Problem::MissingKey.into_response());
            }
            KeyHeader::Missing => {
                tracing::trace!(
                    outcome = "passthrough",
                    reason = "no_key",
                    "request without idempotency key"
                );
                return self.passthrough(parts, body);
            }
            KeyHeader::Invalid(error) => {
                tracing::debug!(outcome = "invalid_key", %error, "idempotency key refused");
                return ResponseFuture::ready(key_problem(&error).into_response());
            }
        };
        let scope = match &config.scope {
            Some(scope) => match scope(&parts) {
                Some(scope) => scope,
                None => {
                    tracing::debug!(
                        outcome = "passthrough",
                        reason = "no_scope",
                        "scope function returned None"
                    );
                    return self.passthrough(parts, body);
                }
            },
            None => String::new(),
        };
        let store_key = composite_key(&scope, &parts, &key);
        let span = tracing::debug_span!("idempotency", key = %key, method = %parts.method, path = parts.uri.path());
        // The inner service was driven to readiness by `poll_ready`; take that instance and
        // leave a clone behind (see tower's docs: "Be careful when cloning inner services").
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let work = Guarded {
            inner,
            store: self.store.clone(),
            config: self.config.clone(),
            key: store_key,
            _body: PhantomData,
        };
        ResponseFuture::guarded(Box::pin(work.run(parts, body).instrument(span)))
    }
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

/// One guarded request: everything from the claim on.
struct Guarded<S, St, ReqBody> {
    inner: S,
    store: St,
    config: Arc<Config>,
    key: String,
    _body: PhantomData<fn(ReqBody)>,
}

type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;

/// What the handler produced, read up to the storage limit.
enum Produced<B> {
    /// Not to be stored: released and returned untouched.
    Unstored(Response<B>, &'static str),
    /// Read to its end within the limit.
    Whole(http::response::Parts, VecDeque<Frame<Bytes>>, Pin<Box<B>>),
    /// Larger than the limit: the frames read so far and the rest.
    TooLarge(http::response::Parts, VecDeque<Frame<Bytes>>, Pin<Box<B>>),
    /// The body failed while being read.
    Failed(BoxError),
}

impl<S, St, ReqBody, ResBody> Guarded<S, St, ReqBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    async fn run(self, parts: Parts, body: ReqBody) -> Answer<ResBody, S::Error> {
        let timings = self.config.timings;
        let hasher = self.config.fingerprint.start(&parts);
        match claim::begin(&self.store, &self.key, &timings).await {
            Ok(Begin::Claimed(token)) => {
                tracing::debug!(outcome = "claimed", "key claimed; running the handler");
                self.original(token, parts, body, hasher).await
            }
            Ok(Begin::Completed { record, waited }) => {
                if waited {
                    tracing::debug!(
                        outcome = "waited",
                        "original finished while the duplicate waited"
                    );
                }
                Ok(duplicate::<ReqBody, ResBody>(&self.config, record, body, hasher).await)
            }
            Ok(Begin::InFlight { waited }) => {
                tracing::info!(
                    outcome = "conflict",
                    waited,
                    "original request still in flight"
                );
                Ok(Problem::InFlight(self.config.retry_after).into_response())
            }
            Err(error) => self.store_failed(error, parts, body).await,
        }
    }

    async fn store_failed(
        mut self,
        error: Failure,
        parts: Parts,
        body: ReqBody,
    ) -> Answer<ResBody, S::Error> {
        match self.config.on_store_error {
            OnStoreError::FailClosed => {
                tracing::error!(outcome = "store_error", %error, "store unavailable; failing closed");
                Ok(Problem::StoreUnavailable(self.config.retry_after).into_response())
            }
            OnStoreError::FailOpen => {
                tracing::warn!(outcome = "store_error", %error, "store unavailable; running without idempotency");
                let request = Request::from_parts(parts, RequestBody::plain(body));
                Ok(self.inner.call(request).await?.map(ResponseBody::inner))
            }
        }
    }

    /// The first request with this key: run it, then store or release.
    async fn original(
        mut self,
        token: OwnerToken,
        parts: Parts,
        body: ReqBody,
        hasher: Option<FingerprintHasher>,
    ) -> Answer<ResBody, S::Error> {
        let timings = self.config.timings;
        let carried: Vec<(HeaderName, HeaderValue)> = self
            .config
            .carried
            .iter()
            .filter_map(|(name, _)| parts.headers.get(name).map(|v| (name.clone(), v.clone())))
            .collect();
        let (request_body, slot, head_hash) = match hasher {
            Some(hasher) if self.config.fingerprint.covers_body() => {
                let (body, slot) = RequestBody::hashing(body, hasher);
                (body, Some(slot), None)
            }
            Some(hasher) => (RequestBody::plain(body), None, Some(hasher.finish())),
            None => (RequestBody::plain(body), None, None),
        };
        let call = self.inner.call(Request::from_parts(parts, request_body));
        let config = self.config.clone();
        let produce = async move {
            let response = call.await?;
            Ok(read_for_storage(response, &config).await)
        };
        let produced = claim::keep_alive(
            &self.store,
            &self.key,
            &token,
            &timings,
            CatchUnwind { inner: produce },
        )
        .await;
        let produced = match produced {
            Ok(Ok(produced)) => produced,
            Ok(Err(error)) => {
                tracing::info!(
                    outcome = "not_stored",
                    reason = "service_error",
                    "inner service failed; releasing the key"
                );
                claim::release(&self.store, &self.key, &token, &timings).await;
                return Err(error);
            }
            Err(_panic) => {
                tracing::error!(
                    outcome = "not_stored",
                    reason = "panic",
                    "handler panicked; releasing the key"
                );
                claim::release(&self.store, &self.key, &token, &timings).await;
                return Ok(Problem::HandlerPanicked.into_response());
            }
        };
        let (head, frames, rest, whole) = match produced {
            Produced::Unstored(response, reason) => {
                tracing::info!(
                    outcome = "not_stored",
                    reason,
                    status = response.status().as_u16(),
                    "response not stored; releasing the key"
                );
                claim::release(&self.store, &self.key, &token, &timings).await;
                return Ok(response.map(ResponseBody::inner));
            }
            Produced::Failed(error) => {
                tracing::error!(outcome = "not_stored", reason = "body_error", %error, "response body failed; releasing the key");
                claim::release(&self.store, &self.key, &token, &timings).await;
                return Ok(Problem::ResponseFailed.into_response());
            }
            Produced::Whole(head, frames, rest) => (head, frames, rest, true),
            Produced::TooLarge(head, frames, rest) => (head, frames, rest, false),
        };
        let fingerprint = match slot {
            Some(slot) => match fingerprint::take_slot(&slot) {
                SlotState::Done(digest) => Some(digest),
                // The handler left part of the body unread: hash the rest (still renewing the
                // lease, as a slow client may take a while).
                SlotState::Leftover(mut rest, hasher) => {
                    let drain = fingerprint::drain(rest.as_mut(), hasher);
                    claim::keep_alive(&self.store, &self.key, &token, &timings, drain)
                        .await
                        .ok()
                }
                SlotState::Failed | SlotState::Reading => None,
            },
            None => head_hash,
        };
        if fingerprint_missing(fingerprint, &self.config) {
            tracing::warn!(
                "request body could not be fingerprinted; duplicates will not be compared"
            );
        }
        if !whole {
            tracing::info!(
                outcome = "body_omitted",
                limit = self.config.max_response_body,
                "response body too large to store; storing status and headers only"
            );
        }
        let keep = |name: &HeaderName| self.config.stores_header(name);
        let body = whole.then(|| frames.iter().filter_map(Frame::data_ref));
        let payload = record::encode(head.status, &head.headers, keep, &carried, body);
        let _ = claim::complete(
            &self.store,
            &self.key,
            &token,
            Record::new(fingerprint, payload),
            &timings,
        )
        .await;
        Ok(Response::from_parts(
            head,
            ResponseBody::prefixed(frames, rest),
        ))
    }
}

/// A duplicate of a completed request: replay, or 422 when the payload differs.
async fn duplicate<ReqBody, ResBody>(
    config: &Config,
    record: Record,
    body: ReqBody,
    hasher: Option<FingerprintHasher>,
) -> Response<ResponseBody<ResBody>>
where
    ReqBody: Body,
    ReqBody::Error: Into<BoxError>,
{
    if let (Some(stored), Some(hasher)) = (record.fingerprint(), hasher) {
        let hashed = if config.fingerprint.covers_body() {
            fingerprint::hash_body(body, hasher).await
        } else {
            Ok(hasher.finish())
        };
        match hashed {
            Ok(fingerprint) if fingerprint == stored => {}
            Ok(_) => {
                tracing::info!(outcome = "mismatch", "key reused with a different payload");
                return Problem::KeyReused.into_response();
            }
            Err(error) => {
                tracing::debug!(outcome = "unreadable_body", %error, "duplicate's body failed");
                return Problem::UnreadableBody.into_response();
            }
        }
    }
    match record::decode(record.into_payload()) {
        Ok(stored) => {
            tracing::debug!(
                outcome = "replayed",
                status = stored.status.as_u16(),
                "replaying stored response"
            );
            replay(stored, config)
        }
        Err(error) => {
            tracing::error!(outcome = "unreadable_record", %error, "stored response cannot be decoded");
            Problem::UnreadableRecord.into_response()
        }
    }
}

/// Whether the body should have been fingerprinted but could not be (it failed, or the
/// handler kept it past its answer).
fn fingerprint_missing(fingerprint: Option<u128>, config: &Config) -> bool {
    fingerprint.is_none() && config.fingerprint.covers_body()
}

/// Reads a storable response's body up to the limit; anything else is returned untouched.
async fn read_for_storage<B>(response: Response<B>, config: &Config) -> Produced<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if !(config.store_status)(response.status()) {
        return Produced::Unstored(response, "status");
    }
    if response.extensions().get::<NoStore>().is_some() || has_no_store(response.headers()) {
        return Produced::Unstored(response, "no_store");
    }
    let (head, body) = response.into_parts();
    let limit = config.max_response_body as u64;
    let mut frames = VecDeque::new();
    let mut body = Box::pin(body);
    if body.size_hint().lower() > limit {
        return Produced::TooLarge(head, frames, body);
    }
    let mut read = 0u64;
    loop {
        match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            None => break,
            Some(Err(error)) => return Produced::Failed(error.into()),
            Some(Ok(frame)) => {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                frames.push_back(frame);
                if read > limit {
                    return Produced::TooLarge(head, frames, body);
                }
            }
        }
    }
    Produced::Whole(head, frames, body)
}

fn has_no_store(headers: &http::HeaderMap) -> bool {
    headers.get_all(CACHE_CONTROL).iter().any(|value| {
        value
            .to_str()
            .map(|v| {
                v.split(',')
                    .any(|d| d.trim().eq_ignore_ascii_case("no-store"))
            })
            .unwrap_or(false)
    })
}

/// Builds the replay of a stored response.
fn replay<B>(stored: record::StoredResponse, config: &Config) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::full(stored.body));
    *response.status_mut() = stored.status;
    let headers = response.headers_mut();
    *headers = stored.headers;
    for (name, value) in stored.carried {
        // Only headers the layer (still) carries are replayed.
        if let Some((_, replayed)) = config.carried.iter().find(|(carried, _)| *carried == name) {
            headers.insert(replayed.clone(), value);
        }
    }
    if stored.body_omitted {
        headers.remove(CONTENT_TYPE);
        headers.insert(BODY_OMITTED_HEADER, HeaderValue::from_static("true"));
    }
    headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}
