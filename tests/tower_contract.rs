//! The tower contract: readiness is the inner service's, and the instance driven to readiness
//! is the one that is called.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tokio_test::{assert_pending, assert_ready_ok};
use tower_idempotency::{IdempotencyLayer, RequestBody};
use tower_test::mock;

type Req = Request<RequestBody<Full<Bytes>>>;

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
    let request = || {
        Request::post("/x")
            .header("idempotency-key", "k")
            .body(Full::new(Bytes::from("{}")))
            .unwrap()
    };
    assert_ready_ok!(service.poll_ready());
    let first = tokio::spawn(service.call(request()));
    let (received, respond) = handle.next_request().await.unwrap();
    assert_eq!(received.headers()["idempotency-key"], "k");
    respond.send_response(Response::new(Full::new(Bytes::from("done"))));
    assert_eq!(first.await.unwrap().unwrap().status(), 200);

    assert_ready_ok!(service.poll_ready());
    let retry = service.call(request()).await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    // The mock would have seen a second request had the handler run again.
    drop(service);
    assert!(handle.next_request().await.is_none());
}
