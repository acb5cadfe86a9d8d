//! The retrying client layer: keys, what is retried and what never is, backoff and jitter,
//! and the whole promise against the layered server with lost answers.

use crate::support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{router, Probe};
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_idempotency::client::{IdempotentRetryLayer, RetryPolicy};
use tower_idempotency::IdempotencyLayer;

/// One request as the server saw it: its key and its body.
type Sighting = (Option<HeaderValue>, Bytes);

/// What a scripted server saw.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Sighting>>>);

/// A server answering the given statuses in turn (the last one forever), recording each request.
fn scripted(
    statuses: &'static [(u16, Option<&'static str>)],
    seen: Seen,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    let calls = Arc::new(AtomicUsize::new(0));
    service_fn(move |request: Request<Full<Bytes>>| {
        let n = calls.fetch_add(1, Ordering::SeqCst).min(statuses.len() - 1);
        let seen = seen.clone();
        async move {
            let key = request.headers().get("idempotency-key").cloned();
            let body = request.into_body().collect().await.unwrap().to_bytes();
            seen.0.lock().unwrap().push((key, body));
            let (status, retry_after) = statuses[n];
            let mut response = Response::builder().status(status);
            if let Some(after) = retry_after {
                response = response.header("retry-after", after);
            }
            Ok::<_, Infallible>(response.body(Full::<Bytes>::default()).unwrap())
        }
    })
}

fn payment() -> Request<Full<Bytes>> {
    Request::post("/payments")
        .body(Full::new(Bytes::from_static(b"{\"amount\":1}")))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn retries_reuse_one_fresh_key_and_the_same_body() {
    let seen = Seen::default();
    let server = scripted(
        &[(503, None), (502, None), (504, None), (201, None)],
        seen.clone(),
    );
    let mut client = ServiceBuilder::new()
        .layer(IdempotentRetryLayer::new())
        .service(server);
    let response = client.ready().await.unwrap().call(payment()).await.unwrap();
    assert_eq!(response.status(), 201);
    let seen = seen.0.lock().unwrap();
    assert_eq!(seen.len(), 4);
    let key = seen[0].0.clone().expect("a key was added");
    let key = key.to_str().unwrap();
    assert_eq!(
        uuid::Uuid::parse_str(key).unwrap().get_version_num(),
        4,
        "a UUID v4"
    );
    assert!(seen
        .iter()
        .all(|(k, body)| k.as_ref().unwrap() == key && body == "{\"amount\":1}"));
}

#[tokio::test(start_paused = true)]
async fn a_request_that_has_a_key_keeps_it_and_each_request_gets_its_own() {
    let seen = Seen::default();
    let mut client = ServiceBuilder::new()
        .layer(IdempotentRetryLayer::new())
        .service(scripted(&[(201, None)], seen.clone()));
    let mut mine = payment();
    mine.headers_mut()
        .insert("idempotency-key", HeaderValue::from_static("mine"));
    client.ready().await.unwrap().call(mine).await.unwrap();
    client.ready().await.unwrap().call(payment()).await.unwrap();
    client.ready().await.unwrap().call(payment()).await.unwrap();
    let get = Request::get("/x").body(Full::default()).unwrap();
    client.ready().await.unwrap().call(get).await.unwrap();
    let seen = seen.0.lock().unwrap();
    assert_eq!(seen[0].0.as_ref().unwrap(), "mine");
    assert_ne!(seen[1].0, seen[2].0, "two logical requests, two keys");
    assert!(seen[3].0.is_none(), "a GET gets no key");
}

/// Sends one payment to a server answering `status` once, then 201: the final status and
/// how many attempts the server saw.
async fn attempts_after(status: u16) -> (u16, usize) {
    let seen = Seen::default();
    let statuses: &'static [(u16, Option<&'static str>)] =
        Box::leak(vec![(status, None), (201, None)].into_boxed_slice());
    let mut client = ServiceBuilder::new()
        .layer(IdempotentRetryLayer::new())
        .service(scripted(statuses, seen.clone()));
    let response = client.ready().await.unwrap().call(payment()).await.unwrap();
    let attempts = seen.0.lock().unwrap().len();
    (response.status().as_u16(), attempts)
}

#[tokio::test(start_paused = true)]
async fn retried_statuses_and_never_a_422() {
    for status in [409u16, 429, 502, 503, 504] {
        assert_eq!(
            attempts_after(status).await,
            (201, 2),
            "{status} is retried"
        );
    }
    for status in [400u16, 401, 404, 422, 500] {
        assert_eq!(
            attempts_after(status).await,
            (status, 1),
            "{status} is never retried"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn connection_errors_are_retried() {
    let calls = Arc::new(AtomicUsize::new(0));
    let server = service_fn({
        let calls = calls.clone();
        move |_request: Request<Full<Bytes>>| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err::<Response<Full<Bytes>>, BoxError>("connection reset".into())
                } else {
                    Ok(Response::new(Full::default()))
                }
            }
        }
    });
    let mut client = ServiceBuilder::new()
        .layer(IdempotentRetryLayer::new())
        .service(server);
    assert_eq!(
        client
            .ready()
            .await
            .unwrap()
            .call(payment())
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn retry_after_sets_the_minimum_wait() {
    let seen = Seen::default();
    let mut client = ServiceBuilder::new()
        .layer(IdempotentRetryLayer::new())
        .service(scripted(&[(409, Some("4")), (201, None)], seen.clone()));
    let started = tokio::time::Instant::now();
    client.ready().await.unwrap().call(payment()).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited <= Duration::from_secs(6),
        "at least the 4 s asked, plus up to half of it as jitter: {waited:?}"
    );
}

/// 200 requests told `Retry-After: 1` together do not come back together: each waits the
/// second plus its own random share, so the retries land at many distinct moments, spread over
/// hundreds of milliseconds (with the floor only, they all landed at +1.000 s).
#[tokio::test(start_paused = true)]
async fn retries_after_retry_after_spread_out() {
    let start = tokio::time::Instant::now();
    let retried_at = Arc::new(Mutex::new(Vec::new()));
    let answered = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let server = service_fn({
        let retried_at = retried_at.clone();
        move |request: Request<Full<Bytes>>| {
            let key = request.headers()["idempotency-key"].clone();
            let first = answered.lock().unwrap().insert(key);
            if !first {
                retried_at.lock().unwrap().push(start.elapsed());
            }
            let status = if first { 503 } else { 201 };
            let response = Response::builder()
                .status(status)
                .header("retry-after", "1")
                .body(Full::<Bytes>::default())
                .unwrap();
            std::future::ready(Ok::<_, Infallible>(response))
        }
    });
    let client = ServiceBuilder::new()
        .layer(IdempotentRetryLayer::new().without_retry_budget())
        .service(server);
    let barrier = Arc::new(tokio::sync::Barrier::new(200));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (client, barrier) = (client.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                client.oneshot(payment()).await.unwrap().status()
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 201);
    }
    let retried_at = retried_at.lock().unwrap();
    assert_eq!(retried_at.len(), 200);
    let millis: std::collections::BTreeSet<u128> =
        retried_at.iter().map(Duration::as_millis).collect();
    let (first, last) = (millis.first().unwrap(), millis.last().unwrap());
    assert!(*first >= 1000, "Retry-After is a floor: {first} ms");
    assert!(millis.len() >= 60, "{} distinct milliseconds", millis.len());
    assert!(last - first >= 300, "spread over {} ms", last - first);
}

#[tokio::test(start_paused = true)]
async fn attempts_and_the_deadline_bound_the_retries() {
    let seen = Seen::default();
    let mut client = ServiceBuilder::new()
        .layer(IdempotentRetryLayer::new().max_attempts(3))
        .service(scripted(&[(503, None)], seen.clone()));
    assert_eq!(
        client
            .ready()
            .await
            .unwrap()
            .call(payment())
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(seen.0.lock().unwrap().len(), 3);

    let seen = Seen::default();
    let mut client = ServiceBuilder::new()
        .layer(
            IdempotentRetryLayer::new()
                .max_attempts(100)
                .deadline(Duration::from_secs(10))
                .without_jitter(),
        )
        .service(scripted(&[(503, Some("3"))], seen.clone()));
    let started = tokio::time::Instant::now();
    client.ready().await.unwrap().call(payment()).await.unwrap();
    assert!(started.elapsed() <= Duration::from_secs(10));
    assert_eq!(
        seen.0.lock().unwrap().len(),
        3,
        "attempts at 0, 4.5 and 9 s (the 3 s floor plus half of it, jitter off); the next \
         would pass 10 s"
    );
}

#[test]
fn jitter_spreads_clients_that_fail_at_the_same_instant() {
    const CLIENTS: usize = 2000;
    let mut seeds = fastrand::Rng::with_seed(42);
    for retry in [0u32, 2, 4] {
        let ceiling = Duration::from_millis(100) * (1 << retry);
        let delays: Vec<Duration> = (0..CLIENTS)
            .map(|_| {
                let layer = IdempotentRetryLayer::new().jitter_seed(seeds.u64(..));
                let policy: RetryPolicy = layer.policy().clone();
                policy.delay(retry, Duration::ZERO)
            })
            .collect();
        let mut distinct = delays.clone();
        distinct.sort();
        distinct.dedup();
        assert!(
            distinct.len() > CLIENTS * 99 / 100,
            "retry {retry}: clients must not retry at the same instant"
        );
        // Spread over the whole window: every tenth of [0, ceiling] gets 5% to 15% of clients.
        let mut buckets = [0usize; 10];
        for delay in &delays {
            assert!(*delay <= ceiling);
            let bucket = ((delay.as_secs_f64() / ceiling.as_secs_f64()) * 10.0).min(9.0) as usize;
            buckets[bucket] += 1;
        }
        for (i, count) in buckets.iter().enumerate() {
            let share = *count as f64 / CLIENTS as f64;
            assert!(
                (0.05..=0.15).contains(&share),
                "retry {retry}, tenth {i}: {share:.3} of the clients"
            );
        }
    }
}

/// The whole promise, in process: the retrying client in front of the layered server, with
/// answers lost after the server stored them. Every logical payment runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_payment_executes_once_despite_lost_answers() {
    const PAYMENTS: usize = 200;
    let probe = Probe::default();
    let server = ServiceBuilder::new()
        .layer(IdempotencyLayer::new())
        .service(router(probe.clone()));
    let dropped = Arc::new(AtomicUsize::new(0));
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(7)));
    // The network: the server answers, but 30% of the answers never arrive.
    let network = service_fn({
        let dropped = dropped.clone();
        move |request: Request<Full<Bytes>>| {
            let (server, dropped, rng) = (server.clone(), dropped.clone(), rng.clone());
            async move {
                let response = server.oneshot(request.map(Body::new)).await?;
                if rng.lock().unwrap().f64() < 0.3 {
                    dropped.fetch_add(1, Ordering::SeqCst);
                    return Err::<_, BoxError>("connection closed before the response".into());
                }
                let (parts, body) = response.into_parts();
                Ok(Response::from_parts(
                    parts,
                    body.collect().await?.to_bytes(),
                ))
            }
        }
    });
    let client = ServiceBuilder::new()
        .layer(
            IdempotentRetryLayer::new()
                .max_attempts(16)
                .base_delay(Duration::from_millis(1)),
        )
        .service(network);
    let tasks: Vec<_> = (0..PAYMENTS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let request = Request::post("/payments")
                    .body(Full::new(Bytes::from(format!("{{\"n\":{i}}}"))))
                    .unwrap();
                client.oneshot(request).await.unwrap()
            })
        })
        .collect();
    let (mut made, mut replays) = (0, 0);
    for task in tasks {
        let response = task.await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        made += 1;
        replays += usize::from(response.headers().contains_key("idempotent-replayed"));
    }
    assert_eq!(
        made, PAYMENTS,
        "the client believes every payment went through"
    );
    assert_eq!(
        probe.executions(),
        PAYMENTS,
        "and the server ran each exactly once"
    );
    assert!(
        dropped.load(Ordering::SeqCst) > 0 && replays > 0,
        "answers were lost and replayed"
    );
    assert!(replays <= dropped.load(Ordering::SeqCst));
}

/// A server that answers 503 to each key's first attempt and 201 to its retry, noting the
/// moment (since `start`) of every attempt per key.
fn first_attempt_fails(
    arrivals: Arc<Mutex<std::collections::HashMap<HeaderValue, Vec<tokio::time::Instant>>>>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |request: Request<Full<Bytes>>| {
        let now = tokio::time::Instant::now();
        let key = request.headers()["idempotency-key"].clone();
        let mut arrivals = arrivals.lock().unwrap();
        let seen = arrivals.entry(key).or_default();
        seen.push(now);
        let status = if seen.len() == 1 { 503 } else { 201 };
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    })
}

/// The herd bug: tower's `Retry` clones the policy into every request, so a generator kept in
/// the policy made every request of one client draw the same delays. 200 concurrent requests
/// through one service instance: their first retries must spread over the 100 ms window
/// (lockstep puts them all in one millisecond). On tokio's paused clock, so that each retry
/// arrives exactly when its drawn delay says, however busy the machine is.
#[tokio::test(start_paused = true)]
async fn concurrent_requests_of_one_client_retry_at_independent_moments() {
    const REQUESTS: usize = 200;
    let arrivals = Arc::new(Mutex::new(std::collections::HashMap::new()));
    // Every request fails once, more than the default budget allows: this test is about
    // the moments of the retries, so it lifts the budget.
    let client = ServiceBuilder::new()
        .layer(IdempotentRetryLayer::new().without_retry_budget())
        .service(first_attempt_fails(arrivals.clone()));
    let barrier = Arc::new(tokio::sync::Barrier::new(REQUESTS));
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let mut client = client.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                client.ready().await.unwrap().call(payment()).await.unwrap()
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().status(), 201);
    }
    let arrivals = arrivals.lock().unwrap();
    assert_eq!(arrivals.len(), REQUESTS);
    let mut buckets: Vec<u128> = arrivals
        .values()
        .map(|seen| {
            assert_eq!(seen.len(), 2, "one failure, one retry");
            (seen[1] - seen[0]).as_millis()
        })
        .collect();
    buckets.sort_unstable();
    buckets.dedup();
    assert!(
        buckets.len() >= 60,
        "first retries fell in only {} distinct milliseconds: {buckets:?}",
        buckets.len()
    );
}

/// The same through one seeded layer: seeding makes a run reproducible, never lockstep.
#[test]
fn a_seeded_layer_still_draws_a_fresh_delay_for_every_request() {
    let layer = IdempotentRetryLayer::new().jitter_seed(7);
    let delays: Vec<Duration> = (0..200)
        .map(|_| layer.policy().clone().delay(0, Duration::ZERO))
        .collect();
    let mut distinct = delays.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() > 195, "{} distinct delays", distinct.len());
    let again: Vec<Duration> = {
        let layer = IdempotentRetryLayer::new().jitter_seed(7);
        (0..200)
            .map(|_| layer.policy().clone().delay(0, Duration::ZERO))
            .collect()
    };
    assert_eq!(delays, again, "the same seed draws the same sequence");
}

/// The retry budget: against a server that always answers 503, 1,000 requests may add at most
/// 20 % retries plus the floor (10 per second over the 10 s window), not 4 retries each.
#[tokio::test(start_paused = true)]
async fn the_retry_budget_caps_retries_against_a_failing_server() {
    const REQUESTS: usize = 1000;
    let seen = Seen::default();
    let client = ServiceBuilder::new()
        .layer(IdempotentRetryLayer::new())
        .service(scripted(&[(503, None)], seen.clone()));
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.ready().await.unwrap().call(payment()).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap().status(), 503);
    }
    let retries = seen.0.lock().unwrap().len() - REQUESTS;
    let budget = REQUESTS / 5 + 10 * 10;
    assert!(
        retries <= budget,
        "{retries} retries; the budget allows {budget}"
    );
    assert!(
        retries >= budget * 9 / 10,
        "the budget is spent, not hoarded: {retries} retries"
    );

    // Without a budget every request makes all its attempts.
    let seen = Seen::default();
    let client = ServiceBuilder::new()
        .layer(IdempotentRetryLayer::new().without_retry_budget())
        .service(scripted(&[(503, None)], seen.clone()));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.ready().await.unwrap().call(payment()).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(seen.0.lock().unwrap().len(), 100 * 5);
}
