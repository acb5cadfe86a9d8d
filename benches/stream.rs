//! Streamed answers in process: time to the first frame and to the end of a 1,000-event
//! server-sent-event stream (25-byte events), bare (no layer), through the layer with a fresh
//! key (the original), replayed from the memory store, and joined live by a duplicate while
//! the original streams (`OnConflict::Join`).
//!
//! The handler's body is fed by a producer task that yields between events, so the layer sees
//! a body that is not ready (a real generation's shape), not one it can read whole at once.
//! In the joined case the producer stops half-way until the joiner has its first frame, so the
//! joiner really follows a live stream.
//!
//! `cargo bench --bench stream` (from `benches/`); figures in BENCHMARKS.md.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tokio::sync::{mpsc, Notify};
use tower::{Service, ServiceExt};
use tower_idempotency::{IdempotencyLayer, OnConflict, Settings};

const EVENTS: u32 = 1000;

/// The handler's body: the frames its producer task sends.
struct EventBody(mpsc::Receiver<Frame<Bytes>>);

impl http_body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

/// The generation: `EVENTS` events from a task that yields between them; with a gate, it
/// waits for it half-way.
#[derive(Clone, Default)]
struct Generate {
    gate: Option<Arc<Notify>>,
}

impl<B> Service<Request<B>> for Generate {
    type Response = Response<EventBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<B>) -> Self::Future {
        let (tx, rx) = mpsc::channel(64);
        let gate = self.gate.clone();
        tokio::spawn(async move {
            for n in 1..=EVENTS {
                if n == EVENTS / 2 {
                    if let Some(gate) = &gate {
                        gate.notified().await;
                    }
                }
                let event = format!("id: {n}\ndata: tok-{n}\n\n");
                if tx.send(Frame::data(Bytes::from(event))).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        });
        let mut response = Response::new(EventBody(rx));
        response.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        std::future::ready(Ok(response))
    }
}

fn request(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut builder = Request::post("/completions");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder
        .body(Full::new(Bytes::from_static(br#"{"tokens":1000}"#)))
        .unwrap()
}

/// Sends `request` and reads its body: (time to the first data frame, time to the end).
/// `on_first` is notified when the first data frame arrives.
async fn timed<S, B>(
    service: &mut S,
    request: Request<Full<Bytes>>,
    on_first: Option<&Notify>,
) -> (Duration, Duration)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body + Unpin,
    B::Error: std::fmt::Debug,
{
    let start = Instant::now();
    let mut body = service
        .ready()
        .await
        .unwrap()
        .call(request)
        .await
        .unwrap()
        .into_body();
    let mut first = None;
    let mut bytes = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.unwrap().data_ref() {
            bytes += bytes::Buf::remaining(data);
            if first.is_none() {
                first = Some(start.elapsed());
                if let Some(on_first) = on_first {
                    on_first.notify_one();
                }
            }
        }
    }
    assert_eq!(bytes, 22_786, "the whole stream");
    (first.unwrap(), start.elapsed())
}

fn streams(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("stream");
    group.sample_size(30);
    let layer = || {
        IdempotencyLayer::with_settings(
            Settings::default().on_conflict(OnConflict::Join(Duration::from_secs(30))),
        )
    };
    for (name, part) in [("first_frame", 0), ("whole", 1)] {
        let pick =
            move |(first, whole): (Duration, Duration)| if part == 0 { first } else { whole };
        group.bench_function(format!("bare/{name}"), |b| {
            b.to_async(&runtime).iter_custom(|iters| async move {
                let mut service = Generate::default();
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += pick(timed(&mut service, request(None), None).await);
                }
                total
            })
        });
        group.bench_function(format!("original/{name}"), |b| {
            b.to_async(&runtime).iter_custom(|iters| async move {
                let mut service = tower::ServiceBuilder::new()
                    .layer(layer())
                    .service(Generate::default());
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let key = format!("original-{i}");
                    total += pick(timed(&mut service, request(Some(&key)), None).await);
                }
                total
            })
        });
        group.bench_function(format!("replay/{name}"), |b| {
            b.to_async(&runtime).iter_custom(|iters| async move {
                let mut service = tower::ServiceBuilder::new()
                    .layer(layer())
                    .service(Generate::default());
                timed(&mut service, request(Some("replayed")), None).await;
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += pick(timed(&mut service, request(Some("replayed")), None).await);
                }
                total
            })
        });
        group.bench_function(format!("joined/{name}"), |b| {
            b.to_async(&runtime).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    // A gate and a service of its own per iteration: no permit left over.
                    let gate = Arc::new(Notify::new());
                    let service = tower::ServiceBuilder::new()
                        .layer(layer())
                        .service(Generate {
                            gate: Some(gate.clone()),
                        });
                    let key = format!("joined-{i}");
                    let mut original = service.clone();
                    let response = ServiceExt::<Request<Full<Bytes>>>::ready(&mut original)
                        .await
                        .unwrap()
                        .call(request(Some(&key)))
                        .await
                        .unwrap();
                    let mut body = response.into_body();
                    // The original streams: its first event is out.
                    let _ = body.frame().await;
                    let reader = tokio::spawn(async move { while body.frame().await.is_some() {} });
                    let mut joiner = service.clone();
                    // The producer goes on once the joiner has its first frame (it followed the
                    // live stream), or after 20 ms (a duplicate that waits for the end gets
                    // no frame before it).
                    let fallback = {
                        let gate = gate.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            gate.notify_one();
                        })
                    };
                    total += pick(timed(&mut joiner, request(Some(&key)), Some(&gate)).await);
                    fallback.abort();
                    reader.await.unwrap();
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, streams);
criterion_main!(benches);
