//! The client side (feature `client`): stamp each unsafe request with an idempotency key, and
//! retry it with that same key, backing off exponentially with full jitter.
//!
//! Idempotency keys only pay off when clients retry with them, and retries only help when
//! they don't all arrive at once: after an outage thousands of clients retrying in lockstep
//! knock the recovering servers down again. [`IdempotentRetryLayer`] does both, as payment
//! SDKs do:
//!
//! * A `POST` or `PATCH` without an `Idempotency-Key` gets a fresh UUID v4 (122 random bits,
//!   from the operating system's generator). A request that has a key keeps it. Every retry
//!   of the request carries the same key and the same body bytes.
//! * **Retried** \[default\]: transport errors (connection refused or reset, timeouts: any error
//!   of the inner service), and the statuses 409 (the original still runs), 429, 502, 503 and
//!   504. **Never retried**: any other status; in particular never a 422 (the key was reused
//!   with another payload: a client bug to surface, not to retry). [`retry_on`] changes this.
//! * **Backoff**: attempt `n` (from 0) waits a uniformly random time in
//!   `[0, min(cap, base × 2ⁿ)]` ("full jitter") [base 100 ms, cap 10 s]. A `Retry-After`
//!   header (seconds or an HTTP date) is a floor, and jitter is added *above* it: the wait is
//!   the floor plus a random share of the larger of that ceiling and half the floor, so a
//!   burst of clients told `Retry-After: 1` comes back spread over 1 to 1.5 s, not in the same
//!   millisecond (see [`RetryPolicy::delay`]). At most \[5\] attempts in all,
//!   and no retry that would start after the overall deadline [30 s from the first attempt].
//!   Every retry of every request draws its own random delay: requests that failed together
//!   (an outage, a deploy) come back at independent moments.
//! * **Retry budget** [on: 20 % of requests plus 10 retries per second, over 10 s]: retries may
//!   add at most that much to the requests this layer sends. When it is spent, a request that
//!   would be retried returns its last answer (a `warn` event says so), so a client never
//!   multiplies the load on a server that is already failing. See
//!   [`retry_budget`](IdempotentRetryLayer::retry_budget).
//! * Each retry is a `tracing` event (attempt, wait, reason). The final response is the
//!   server's: a replay carries `idempotent-replayed: true`.
//!
//! The request body must be cloneable to be sent again: `Full<Bytes>`, `String`, `Vec<u8>`,
//! `Bytes`. A streaming body cannot be replayed: collect it first
//! (`http_body_util::BodyExt::collect`), or send it without this layer.
//!
//! Built on tower's retry machinery ([`tower::retry::Retry`] with a [`Policy`]); tower's own
//! backoff helpers add jitter *on top of* the exponential delay and know nothing of
//! `Retry-After`, so the delay is computed here.
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
//! use tower_idempotency::client::IdempotentRetryLayer;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // A server that answers 503 twice, then 201.
//! let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
//! let server = service_fn(move |request: Request<Full<Bytes>>| {
//!     let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//!     assert!(request.headers().contains_key("idempotency-key"));
//!     async move {
//!         let status = if n < 2 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::CREATED };
//!         Ok::<_, Infallible>(Response::builder().status(status).body(Full::<Bytes>::default()).unwrap())
//!     }
//! });
//! let mut client = ServiceBuilder::new().layer(IdempotentRetryLayer::new()).service(server);
//! let request = Request::post("/payments").body(Full::new(Bytes::from("{}"))).unwrap();
//! let response = client.ready().await.unwrap().call(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::CREATED);
//! # }
//! ```
//!
//! [`retry_on`]: IdempotentRetryLayer::retry_on
//! [`Policy`]: tower::retry::Policy

use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::{Policy, Retry};
use tower_layer::Layer;
use tower_service::Service;

/// What an attempt produced, as [`IdempotentRetryLayer::retry_on`] sees it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Attempt {
    /// The inner service failed (connection refused or reset, timeout, …).
    Error,
    /// The server answered with this status.
    Status(StatusCode),
}

type RetryOn = dyn Fn(Attempt) -> bool + Send + Sync;

/// The default: transport errors, 409, 429, 502, 503, 504.
pub fn default_retry_on(attempt: Attempt) -> bool {
    match attempt {
        Attempt::Error => true,
        Attempt::Status(status) => matches!(status.as_u16(), 409 | 429 | 502 | 503 | 504),
    }
}

/// Stamps idempotency keys and retries with backoff. See the [module docs](self).
#[derive(Clone)]
pub struct IdempotentRetryLayer {
    header: HeaderName,
    policy: RetryPolicy,
}

impl IdempotentRetryLayer {
    /// The defaults: POST and PATCH, `Idempotency-Key`, 5 attempts, 100 ms base, 10 s cap,
    /// 30 s deadline, full jitter, a retry budget of 20 % plus 10 retries per second.
    pub fn new() -> Self {
        Self {
            header: HeaderName::from_static("idempotency-key"),
            policy: RetryPolicy::default(),
        }
    }

    /// The methods that get a key and are retried [POST, PATCH]. Other requests pass once.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.policy.settings().methods = methods.into_iter().collect();
        self
    }

    /// The header that carries the key \[`Idempotency-Key`\].
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }

    /// Attempts in all, the first included \[5\].
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.policy.settings().max_attempts = attempts.max(1);
        self
    }

    /// The first backoff ceiling [100 ms], doubled at each attempt up to the cap.
    pub fn base_delay(mut self, base: Duration) -> Self {
        self.policy.settings().base = base;
        self
    }

    /// The largest backoff ceiling [10 s].
    pub fn max_delay(mut self, cap: Duration) -> Self {
        self.policy.settings().cap = cap;
        self
    }

    /// No retry starts later than this after the first attempt [30 s].
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.policy.settings().overall = deadline;
        self
    }

    /// Which attempts are retried [`default_retry_on`].
    pub fn retry_on(mut self, retry_on: impl Fn(Attempt) -> bool + Send + Sync + 'static) -> Self {
        self.policy.settings().retry_on = Arc::new(retry_on);
        self
    }

    /// Seeds the jitter, for reproducible tests: every request of every service made by this
    /// layer then draws its delays from one seeded generator (behind a lock), so a run is
    /// repeatable and requests still never share a delay sequence. Unseeded \[default\], each
    /// draw comes from a per-thread generator seeded from the operating system.
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.policy.settings().jitter =
            Jitter::Seeded(Arc::new(Mutex::new(fastrand::Rng::with_seed(seed))));
        self
    }

    /// Turns jitter off: every retry waits the full ceiling `min(cap, base × 2ⁿ)`. Clients
    /// that fail together then retry together (a thundering herd); this exists to measure
    /// that, not for production.
    pub fn without_jitter(mut self) -> Self {
        self.policy.settings().jitter = Jitter::Off;
        self
    }

    /// The retry budget [20 % of requests, plus a floor of 10 retries per second, over a
    /// 10 s window]: retries may add at most `ratio` of the requests sent through this layer
    /// (every service it makes shares one budget), plus `min_per_second`. When the budget is
    /// spent, a request that would be retried returns its last answer instead (logged at
    /// `warn`), so a client never multiplies the load on a server that is already failing.
    ///
    /// # Panics
    ///
    /// When `ratio` is negative, above 1000 or not a number.
    pub fn retry_budget(mut self, ratio: f32, min_per_second: u32) -> Self {
        assert!(
            (0.0..=1000.0).contains(&ratio),
            "the retry budget's ratio must be within [0, 1000], got {ratio}"
        );
        self.policy.settings().budget = Some(Arc::new(TpsBudget::new(
            BUDGET_WINDOW,
            min_per_second,
            ratio,
        )));
        self
    }

    /// No retry budget: every request makes all its attempts, however many fail.
    pub fn without_retry_budget(mut self) -> Self {
        self.policy.settings().budget = None;
        self
    }

    /// The retry policy this layer uses, to inspect its delays.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

impl Default for IdempotentRetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for IdempotentRetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentRetryLayer")
            .field("header", &self.header)
            .field("policy", &self.policy)
            .finish()
    }
}

impl<S> Layer<S> for IdempotentRetryLayer {
    type Service = IdempotentRetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotentRetry {
            header: self.header.clone(),
            policy: self.policy.clone(),
            inner,
        }
    }
}

/// The service [`IdempotentRetryLayer`] makes: stamps the key, then runs the request under
/// tower's [`Retry`] with a policy of its own (its retry count and deadline belong to it).
#[derive(Clone, Debug)]
pub struct IdempotentRetry<S> {
    header: HeaderName,
    policy: RetryPolicy,
    inner: S,
}

impl<S, B, ResBody> Service<Request<B>> for IdempotentRetry<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
    B: Clone,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = tower::retry::future::ResponseFuture<RetryPolicy, S, Request<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let retried = self.policy.settings.methods.contains(request.method());
        if retried && !request.headers().contains_key(&self.header) {
            let key = uuid::Uuid::new_v4().to_string();
            let value = HeaderValue::try_from(key).expect("a UUID is a valid header value");
            request.headers_mut().insert(self.header.clone(), value);
        }
        if retried {
            if let Some(budget) = &self.policy.settings.budget {
                budget.deposit();
            }
        }
        // The instance `poll_ready` drove to readiness serves this request; a clone stays.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Retry::new(self.policy.for_request(), inner).call(request)
    }
}

/// How long the retry budget remembers requests.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Where the random part of a delay comes from.
#[derive(Clone)]
enum Jitter {
    /// Full jitter from the calling thread's generator (seeded from the OS per thread).
    ThreadLocal,
    /// Full jitter from one seeded generator shared by every request, for reproducible runs.
    Seeded(Arc<Mutex<fastrand::Rng>>),
    /// No jitter: the full ceiling.
    Off,
}

/// What a layer's policies share: the configuration, the seeded generator, the budget.
#[derive(Clone)]
struct Settings {
    methods: Vec<Method>,
    max_attempts: u32,
    base: Duration,
    cap: Duration,
    overall: Duration,
    retry_on: Arc<RetryOn>,
    jitter: Jitter,
    budget: Option<Arc<TpsBudget>>,
}

/// The retry [`Policy`]: which attempts to retry, and how long to wait before each retry.
///
/// The layer keeps one as a template; each request runs with its own copy, whose retry count
/// and deadline belong to that request alone. The configuration, the retry budget and a seeded
/// generator are shared; the random delays never are.
#[derive(Clone)]
pub struct RetryPolicy {
    settings: Arc<Settings>,
    /// Retries made so far for this request.
    retries: u32,
    /// No retry starts after this instant.
    deadline: Option<Instant>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            settings: Arc::new(Settings {
                methods: vec![Method::POST, Method::PATCH],
                max_attempts: 5,
                base: Duration::from_millis(100),
                cap: Duration::from_secs(10),
                overall: Duration::from_secs(30),
                retry_on: Arc::new(default_retry_on),
                jitter: Jitter::ThreadLocal,
                budget: Some(Arc::new(TpsBudget::new(BUDGET_WINDOW, 10, 0.2))),
            }),
            retries: 0,
            deadline: None,
        }
    }
}

impl RetryPolicy {
    fn settings(&mut self) -> &mut Settings {
        Arc::make_mut(&mut self.settings)
    }

    /// A fresh policy for one request: no retries yet, its deadline counted from now.
    fn for_request(&self) -> Self {
        Self {
            settings: self.settings.clone(),
            retries: 0,
            deadline: Some(Instant::now() + self.settings.overall),
        }
    }

    /// The wait before retry number `retry` (0 for the first retry). Without a floor
    /// (`at_least` zero): uniformly random in `[0, min(cap, base × 2^retry)]`. With a floor
    /// (from `Retry-After`): the floor **plus** a uniformly random share of the larger of that
    /// ceiling and half the floor (itself at most the cap), so that clients told the same
    /// `Retry-After` come back spread over the following moments instead of all at once
    /// (`Retry-After: 1` on the first retry: between 1 and 1.5 s). Every call draws a fresh
    /// random number.
    pub fn delay(&self, retry: u32, at_least: Duration) -> Duration {
        let settings = &self.settings;
        let mut ceiling = settings
            .base
            .saturating_mul(1u32 << retry.min(20))
            .min(settings.cap);
        if !at_least.is_zero() {
            ceiling = ceiling.max((at_least / 2).min(settings.cap));
        }
        let range = 0..=ceiling.as_nanos().min(u64::MAX as u128) as u64;
        let nanos = match &settings.jitter {
            Jitter::ThreadLocal => fastrand::u64(range),
            Jitter::Seeded(rng) => rng.lock().unwrap_or_else(|e| e.into_inner()).u64(range),
            Jitter::Off => *range.end(),
        };
        at_least.saturating_add(Duration::from_nanos(nanos))
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = &self.settings;
        f.debug_struct("RetryPolicy")
            .field("methods", &settings.methods)
            .field("max_attempts", &settings.max_attempts)
            .field("base", &settings.base)
            .field("cap", &settings.cap)
            .field("deadline", &settings.overall)
            .field("budget", &settings.budget)
            .finish_non_exhaustive()
    }
}

/// The minimum wait a `Retry-After` header asks for: delta-seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(
        date.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

impl<B: Clone, ResBody, E> Policy<Request<B>, Response<ResBody>, E> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        request: &mut Request<B>,
        result: &mut Result<Response<ResBody>, E>,
    ) -> Option<Self::Future> {
        let settings = self.settings.clone();
        if !settings.methods.contains(request.method()) {
            return None;
        }
        let (answer, at_least) = match result {
            Ok(response) => (
                Attempt::Status(response.status()),
                retry_after(response.headers()),
            ),
            Err(_) => (Attempt::Error, None),
        };
        if !(settings.retry_on)(answer) {
            return None;
        }
        let attempt = self.retries + 1;
        if attempt >= settings.max_attempts {
            tracing::warn!(attempts = attempt, ?answer, "giving up: no attempts left");
            return None;
        }
        let wait = self.delay(self.retries, at_least.unwrap_or(Duration::ZERO));
        let now = Instant::now();
        if self.deadline.is_some_and(|deadline| now + wait > deadline) {
            tracing::warn!(
                attempts = attempt,
                ?answer,
                "giving up: the next retry would pass the deadline"
            );
            return None;
        }
        if settings
            .budget
            .as_ref()
            .is_some_and(|budget| !budget.withdraw())
        {
            tracing::warn!(
                attempts = attempt,
                ?answer,
                "giving up: the retry budget is spent (the server is failing for many requests)"
            );
            return None;
        }
        self.retries += 1;
        tracing::info!(
            attempt = attempt + 1,
            wait_ms = wait.as_millis() as u64,
            reason = ?answer,
            key = ?request.headers().get("idempotency-key"),
            "retrying with the same idempotency key"
        );
        Some(tokio::time::sleep(wait))
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        let mut clone = Request::builder()
            .method(request.method().clone())
            .uri(request.uri().clone())
            .version(request.version())
            .body(request.body().clone())
            .ok()?;
        *clone.headers_mut() = request.headers().clone();
        Some(clone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let in_a_minute = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(61));
        headers.insert(RETRY_AFTER, HeaderValue::try_from(in_a_minute).unwrap());
        let wait = retry_after(&headers).unwrap();
        assert!(
            wait > Duration::from_secs(55) && wait <= Duration::from_secs(61),
            "{wait:?}"
        );
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(
            retry_after(&headers),
            Some(Duration::ZERO),
            "a date in the past asks for no wait"
        );
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn delays_stay_within_the_doubling_ceiling_and_the_cap() {
        let policy = RetryPolicy::default();
        for retry in 0..12 {
            let ceiling = (Duration::from_millis(100) * (1 << retry)).min(Duration::from_secs(10));
            for _ in 0..200 {
                assert!(policy.delay(retry, Duration::ZERO) <= ceiling);
            }
        }
        for _ in 0..200 {
            let wait = policy.delay(0, Duration::from_secs(3));
            assert!(
                wait >= Duration::from_secs(3) && wait <= Duration::from_millis(4500),
                "Retry-After is a floor, with up to half of it above: {wait:?}"
            );
        }
        let off = RetryPolicy::default();
        let mut off_settings = off.clone();
        off_settings.settings().jitter = Jitter::Off;
        assert_eq!(
            off_settings.delay(0, Duration::from_secs(3)),
            Duration::from_millis(4500),
            "without jitter, the floor and the whole share"
        );
    }

    #[test]
    fn the_default_retries_transient_outcomes_only() {
        assert!(default_retry_on(Attempt::Error));
        for status in [409, 429, 502, 503, 504] {
            assert!(
                default_retry_on(Attempt::Status(StatusCode::from_u16(status).unwrap())),
                "{status}"
            );
        }
        for status in [200, 201, 400, 401, 404, 422, 500] {
            assert!(
                !default_retry_on(Attempt::Status(StatusCode::from_u16(status).unwrap())),
                "{status}"
            );
        }
    }
}
