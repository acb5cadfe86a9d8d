//! A test application: an axum router whose handler is steered by request headers, behind
//! the idempotency layer, with counters and gates to observe and hold the handler.
#![allow(dead_code, unreachable_pub)]

pub mod demo;
pub mod proxy;
pub mod redis_stats;
pub mod servers;
#[macro_use]
pub mod shared_store;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::{Notify, Semaphore};
use tower::{Service, ServiceExt};
use tower_idempotency::store::{
    ClaimOutcome, OwnerToken, Record, RecoveryPoint, Store, StoreError,
};
use tower_idempotency::{Idempotency, IdempotencyLayer, NoStore, RequestBody, ResponseBody};

/// What the handler did, shared with the test.
#[derive(Clone)]
pub struct Probe {
    pub executions: Arc<AtomicUsize>,
    pub finished: Arc<AtomicUsize>,
    /// Signalled each time a handler starts.
    pub started: Arc<Notify>,
    /// Held handlers (`x-hold`) wait for a permit.
    pub gate: Arc<Semaphore>,
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            executions: Default::default(),
            finished: Default::default(),
            started: Default::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
}

impl Probe {
    pub fn executions(&self) -> usize {
        self.executions.load(Ordering::SeqCst)
    }

    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }

    /// Waits until the handler has started `n` times in all.
    pub async fn started(&self, n: usize) {
        loop {
            let notified = self.started.notified();
            if self.executions() >= n {
                return;
            }
            notified.await;
        }
    }

    pub fn release_held(&self, n: usize) {
        self.gate.add_permits(n);
    }
}

/// The handler. Request headers steer it:
/// `x-hold` waits for the gate, `x-status: N` answers N, `x-panic` panics,
/// `x-response-bytes: N` answers N bytes, `x-no-store: header|extension` opts out of storage,
/// `x-read: N` reads only the first N body bytes, `x-set-cookie` sets a cookie,
/// `x-delay-ms: N` sleeps N ms.
async fn handler(State(probe): State<Probe>, request: Request) -> Response {
    let n = probe.executions.fetch_add(1, Ordering::SeqCst) + 1;
    probe.started.notify_one();
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if header("x-hold").is_some() {
        probe.gate.acquire().await.unwrap().forget();
    }
    if let Some(ms) = header("x-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    if header("x-panic").is_some() {
        panic!("handler panicked on purpose");
    }
    let body_len = match header("x-read") {
        Some(limit) => {
            let limit: usize = limit.parse().unwrap();
            let mut body = body;
            let mut read = 0;
            while read < limit {
                match body.frame().await {
                    Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                    _ => break,
                }
            }
            read
        }
        None => body
            .collect()
            .await
            .map(|b| b.to_bytes().len())
            .unwrap_or(0),
    };
    let status = header("x-status").map_or(StatusCode::CREATED, |s| {
        StatusCode::from_u16(s.parse().unwrap()).unwrap()
    });
    let payload = match header("x-response-bytes") {
        Some(size) => Bytes::from(vec![b'r'; size.parse().unwrap()]),
        None => Bytes::from(format!(
            r#"{{"execution":{n},"body_len":{body_len},"path":"{}","query":"{}"}}"#,
            parts.uri.path(),
            parts.uri.query().unwrap_or("")
        )),
    };
    let mut response = (status, payload).into_response();
    let out = response.headers_mut();
    out.insert("content-type", HeaderValue::from_static("application/json"));
    out.insert("x-execution", HeaderValue::from(n));
    out.insert("connection", HeaderValue::from_static("keep-alive"));
    if header("x-set-cookie").is_some() {
        out.insert("set-cookie", HeaderValue::from_static("session=secret"));
    }
    match header("x-no-store").as_deref() {
        Some("header") => {
            out.insert(
                "cache-control",
                HeaderValue::from_static("private, no-store"),
            );
        }
        Some("extension") => {
            response.extensions_mut().insert(NoStore);
        }
        _ => {}
    }
    probe.finished.fetch_add(1, Ordering::SeqCst);
    response
}

pub fn router(probe: Probe) -> Router {
    Router::new()
        .route("/payments", any(handler))
        .route("/other", post(handler))
        .with_state(probe)
}

pub type App<St> = Idempotency<Router, St>;

/// The router behind `layer`, and its probe.
pub fn app<St: Clone>(layer: IdempotencyLayer<St>) -> (App<St>, Probe) {
    let probe = Probe::default();
    (tower::Layer::layer(&layer, router(probe.clone())), probe)
}

/// A POST to /payments with `key` and `body`, plus extra headers.
pub fn request(
    key: Option<&str>,
    body: &'static str,
    headers: &[(&str, &str)],
) -> axum::http::Request<Body> {
    let mut builder = axum::http::Request::post("/payments");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::from(body)).unwrap()
}

#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Asserts an RFC 9457 problem with `status` whose type ends with `#slug`.
    pub fn assert_problem(&self, status: u16, slug: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {:?}", self.body);
        assert_eq!(self.headers["content-type"], "application/problem+json");
        let doc = self.json();
        assert!(
            doc["type"].as_str().unwrap().ends_with(&format!("#{slug}")),
            "{doc}"
        );
        assert_eq!(doc["status"], status);
        assert!(
            doc["title"].is_string() && doc["detail"].is_string(),
            "{doc}"
        );
    }
}

pub async fn send<S, B>(service: &mut S, request: axum::http::Request<B>) -> Answer
where
    S: Service<axum::http::Request<B>, Response = Response<ResponseBody<Body>>, Error = Infallible>,
{
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

/// A request body delivered in `chunk`-sized frames, `total` bytes of `fill`, with the last
/// byte replaced by `last`.
pub struct ChunkedBody {
    chunks: VecDeque<Bytes>,
}

impl ChunkedBody {
    pub fn new(total: usize, chunk: usize, fill: u8, last: u8) -> Self {
        let mut chunks = VecDeque::new();
        let block = Bytes::from(vec![fill; chunk]);
        let mut left = total;
        while left > 0 {
            let n = chunk.min(left);
            if n == left {
                let mut tail = vec![fill; n];
                *tail.last_mut().unwrap() = last;
                chunks.push_back(Bytes::from(tail));
            } else {
                chunks.push_back(block.slice(..n));
            }
            left -= n;
        }
        Self { chunks }
    }
}

impl http_body::Body for ChunkedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

/// How a [`FaultyStore`] misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Every call fails.
    Fail,
    /// Every call hangs forever.
    Hang,
    /// `complete` panics (a bug in a store); other calls work.
    PanicOnComplete,
    /// Recovery points are kept, but every save fails (a full disk, an outage during the
    /// save); other calls work.
    FailPointSaves,
}

/// A store that delegates to a memory store until told to fail or hang: a store outage.
#[derive(Clone)]
pub struct FaultyStore {
    inner: tower_idempotency::store::MemoryStore,
    fault: Arc<std::sync::Mutex<Fault>>,
    /// How many claims it was asked for.
    pub claims: Arc<AtomicUsize>,
}

impl FaultyStore {
    pub fn new() -> Self {
        Self {
            inner: Default::default(),
            fault: Arc::new(std::sync::Mutex::new(Fault::None)),
            claims: Arc::default(),
        }
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    async fn gate(&self) -> Result<(), StoreError> {
        let fault = *self.fault.lock().unwrap();
        match fault {
            Fault::None | Fault::PanicOnComplete | Fault::FailPointSaves => Ok(()),
            Fault::Fail => Err(StoreError::backend(
                "connection refused (store password=hunter2)",
            )),
            Fault::Hang => std::future::pending().await,
        }
    }
}

impl Store for FaultyStore {
    async fn claim_as(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        self.gate().await?;
        self.inner.claim_as(key, token, lease).await
    }

    async fn renew(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.gate().await?;
        self.inner.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &str,
        token: &OwnerToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if matches!(*self.fault.lock().unwrap(), Fault::PanicOnComplete) {
            panic!("a bug in the store's complete");
        }
        self.gate().await?;
        self.inner.complete(key, token, record, ttl).await
    }

    async fn release(&self, key: &str, token: &OwnerToken) -> Result<(), StoreError> {
        self.gate().await?;
        self.inner.release(key, token).await
    }

    async fn save_point(
        &self,
        _key: &str,
        _token: &OwnerToken,
        _point: &RecoveryPoint,
        _ttl: Duration,
    ) -> Result<(), StoreError> {
        // Points are offered only by a store told to fail their saves: elsewhere this store
        // keeps none, as a custom store without them.
        match *self.fault.lock().unwrap() {
            Fault::FailPointSaves => Err(StoreError::backend("database or disk is full")),
            _ => Err(StoreError::Unsupported("recovery points")),
        }
    }

    async fn load_point(
        &self,
        key: &str,
        token: &OwnerToken,
    ) -> Result<Option<RecoveryPoint>, StoreError> {
        let fault = *self.fault.lock().unwrap();
        match fault {
            Fault::FailPointSaves => self.inner.load_point(key, token).await,
            _ => Err(StoreError::Unsupported("recovery points")),
        }
    }
}

/// `RequestBody` is what the router receives; re-exported so tests can name the service type.
pub type Inner = RequestBody<Body>;
