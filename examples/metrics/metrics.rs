//! Outcome counters for the idempotency layer through the `metrics` facade.
//!
//! ```text
//! cargo run --example metrics
//! ```
//!
//! `Settings::on_outcome` is called once per request with a typed `Outcome`; here it
//! increments `idempotency_requests_total{outcome="..."}`. In a service, install the exporter
//! you use (Prometheus, StatsD, OpenTelemetry) instead of the debugging recorder that prints
//! the counters below.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_idempotency::{IdempotencyLayer, RequestBody, Settings};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).expect("no recorder installed yet");

    let layer = IdempotencyLayer::with_settings(Settings::default().on_outcome(|outcome| {
        metrics::counter!("idempotency_requests_total", "outcome" => outcome.as_str()).increment(1);
    }));
    let mut service = ServiceBuilder::new().layer(layer).service(service_fn(
        |request: Request<RequestBody<Full<Bytes>>>| async move {
            let status = if request.uri().path() == "/fail" {
                StatusCode::BAD_GATEWAY
            } else {
                StatusCode::CREATED
            };
            let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
            *response.status_mut() = status;
            Ok::<_, Infallible>(response)
        },
    ));
    let send = |path: &str, key: Option<&str>, body: &'static str| {
        let mut request = Request::post(path);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    for request in [
        send("/payments", Some("a"), "{}"),
        send("/payments", Some("a"), "{}"),        // replayed
        send("/payments", Some("a"), "{\"x\":1}"), // mismatch
        send("/payments", Some("a,b"), "{}"),      // invalid key
        send("/payments", None, "{}"),             // passthrough
        send("/fail", Some("f"), "{}"),            // released: status
    ] {
        service.ready().await.unwrap().call(request).await.unwrap();
    }

    let mut lines: Vec<String> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(n) => {
                let labels: Vec<String> = key
                    .key()
                    .labels()
                    .map(|l| format!("{}=\"{}\"", l.key(), l.value()))
                    .collect();
                Some(format!("{}{{{}}} {n}", key.key().name(), labels.join(",")))
            }
            _ => None,
        })
        .collect();
    lines.sort();
    for line in lines {
        println!("{line}");
    }
}
