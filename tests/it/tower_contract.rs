//! The tower contract: readiness is the inner service's, and the instance driven to readiness
//! is the one that is called.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tokio_test::{assert_pending, assert_ready_ok};
use tower_idempotency::{IdempotencyLayer, RequestBody};
use tower_test::mock;

type Req = Request<RequestBody<Full<Bytes>>>;

/// A POST with the idempotency key `k`.
fn keyed_request() -> Request<Full<Bytes>> {
    Request::post("/x")
        .header("idempotency-key", "k")
        .body(Full::new(Bytes::from("{}")))
        .unwrap()
}

#[tokio::test]
async fn poll_ready_is_forwarded_to_the_inner_service() {
    let (mut service, mut handle) =
        mock::spawn_layer::<Req, Response<Full<Bytes>>, _>(IdempotencyLayer::new());
    handle.allow(0);
    assert_pending!(service.poll_ready());
    handle.allow(1);
    assert_ready_ok!(service.poll_ready());
}

#[tokio::test]
async fn a_guarded_request_reaches_the_inner_service_once() {
    let (mut service, mut handle) =
        mock::spawn_layer::<Req, Response<Full<Bytes>>, _>(IdempotencyLayer::new());
    handle.allow(2);
    assert_ready_ok!(service.poll_ready());
    let first = tokio::spawn(service.call(keyed_request()));
    let (received, respond) = handle.next_request().await.unwrap();
    assert_eq!(received.headers()["idempotency-key"], "k");
    respond.send_response(Response::new(Full::new(Bytes::from("done"))));
    assert_eq!(first.await.unwrap().unwrap().status(), 200);

    assert_ready_ok!(service.poll_ready());
    let retry = service.call(keyed_request()).await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    // The mock would have seen a second request had the handler run again.
    drop(service);
    assert!(handle.next_request().await.is_none());
}

#[tokio::test]
async fn an_inner_service_error_is_returned_and_releases_the_key() {
    let (mut service, mut handle) =
        mock::spawn_layer::<Req, Response<Full<Bytes>>, _>(IdempotencyLayer::new());
    handle.allow(2);
    assert_ready_ok!(service.poll_ready());
    let first = tokio::spawn(service.call(keyed_request()));
    let (_, respond) = handle.next_request().await.unwrap();
    respond.send_error("upstream connection reset");
    assert_eq!(
        first.await.unwrap().unwrap_err().to_string(),
        "upstream connection reset"
    );
    // Released: the retry reaches the inner service again.
    assert_ready_ok!(service.poll_ready());
    let retry = tokio::spawn(service.call(keyed_request()));
    let (_, respond) = handle.next_request().await.unwrap();
    respond.send_response(Response::new(Full::new(Bytes::from("ok"))));
    assert_eq!(retry.await.unwrap().unwrap().status(), 200);
}

/// A response body that fails after its first chunk.
struct FailingBody(bool);

impl http_body::Body for FailingBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if self.0 {
            return std::task::Poll::Ready(Some(Err(std::io::Error::other("disk gone"))));
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from("partial")))))
    }
}

#[tokio::test]
async fn a_failing_response_body_answers_500_and_releases_the_key() {
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tower::{Service, ServiceExt};

    let calls = Arc::new(AtomicUsize::new(0));
    let inner = tower::service_fn({
        let calls = calls.clone();
        move |_req: Req| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, std::convert::Infallible>(Response::new(FailingBody(false))) }
        }
    });
    let mut service = tower::Layer::layer(&IdempotencyLayer::new(), inner);
    for _ in 0..2 {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(keyed_request())
            .await
            .unwrap();
        assert_eq!(response.status(), 500);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("response-failed"));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "released: the retry ran again"
    );
}

/// A response body that ends with trailers.
struct WithTrailers(Option<Bytes>, Option<http::HeaderMap>);

impl http_body::Body for WithTrailers {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let frame = match self.0.take() {
            Some(data) => Some(http_body::Frame::data(data)),
            None => self.1.take().map(http_body::Frame::trailers),
        };
        std::task::Poll::Ready(frame.map(Ok))
    }
}

/// Trailers are part of the outcome (gRPC's status lives there, and so may an HTTP checksum):
/// stored with the response and replayed after its body.
#[tokio::test]
async fn a_response_with_trailers_is_replayed_with_them() {
    use http_body_util::BodyExt;
    use tower::{service_fn, ServiceExt};
    let handler = service_fn(|_: Req| async {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("abc123"));
        Ok::<_, std::convert::Infallible>(Response::new(WithTrailers(
            Some(Bytes::from("body")),
            Some(trailers),
        )))
    });
    let service = tower::Layer::layer(&IdempotencyLayer::new(), handler);
    for attempt in 0..2 {
        let response = service.clone().oneshot(keyed_request()).await.unwrap();
        assert_eq!(
            response.headers().contains_key("idempotent-replayed"),
            attempt == 1
        );
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(
            collected.trailers().unwrap()["x-checksum"],
            "abc123",
            "attempt {attempt}"
        );
        assert_eq!(collected.to_bytes(), "body");
    }
}
