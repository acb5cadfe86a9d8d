//! What `benches/layer.rs` and the peer bench (`benches/peer/`) drive alike: the handler, its
//! ~1 KiB answer, the request and the loop step. Included by both with `#[path]`, so that the
//! two crates' paths are the same requests through the same code.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};

/// A ~1 KiB JSON answer, as a typical create endpoint returns.
pub fn payload() -> Bytes {
    let mut json =
        String::from(r#"{"id":"pay_0123456789abcdef","amount":1000,"currency":"usd","metadata":{"#);
    while json.len() < 1000 {
        json.push_str(r#""k":"vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv","#);
    }
    json.push_str(r#""end":true}}"#);
    Bytes::from(json)
}

/// The handler: answers the fixed payload, serialised anew for each request as a JSON handler's
/// body is (a buffer of its own, not a clone of a shared one). Generic over the request body so
/// that the same function serves bare and layered.
#[derive(Clone)]
pub struct Handler(pub Bytes);

impl<B> Service<Request<B>> for Handler {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<B>) -> Self::Future {
        let mut response = Response::new(Full::new(Bytes::copy_from_slice(&self.0)));
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        std::future::ready(Ok(response))
    }
}

pub const BODY: &[u8] = br#"{"amount":1000,"currency":"usd"}"#;

/// Every variant builds the same request: POST, a 32-byte body, and one header whose value
/// comes from a counter. Only the header's name differs (the key header, or another one).
pub fn request(header: &'static str, n: u64) -> Request<Full<Bytes>> {
    Request::post("/payments")
        .header(header, HeaderValue::from(n))
        .body(Full::new(Bytes::from_static(BODY)))
        .unwrap()
}

pub async fn drive<S, B>(service: &mut S, request: Request<Full<Bytes>>) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len()
}
