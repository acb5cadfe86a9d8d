//! The counting mode of `benches/layer.rs` (`LAYER_COUNT=PATH:N`) through the `idempotent`
//! crate 2.0's tower layer on its memory store: the same ~1 KiB handler, the same requests (a
//! POST with a 32-byte body and one header from a counter), the same current-thread runtime,
//! so that `benches/timed.sh` and `benches/instructions.sh` time and count it as they do this
//! crate's paths (`BIN=` this binary). Paths: `bare_handler`, `passthrough_no_key`, `replay`,
//! `first_request_fresh_key` (its store is unbounded, so it never evicts).

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};

/// The same ~1 KiB JSON answer as `benches/layer.rs`.
fn payload() -> Bytes {
    let mut json =
        String::from(r#"{"id":"pay_0123456789abcdef","amount":1000,"currency":"usd","metadata":{"#);
    while json.len() < 1000 {
        json.push_str(r#""k":"vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv","#);
    }
    json.push_str(r#""end":true}}"#);
    Bytes::from(json)
}

#[derive(Clone)]
struct Handler(Bytes);

impl<B> Service<Request<B>> for Handler {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<B>) -> Self::Future {
        let mut response = Response::new(Full::new(self.0.clone()));
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        std::future::ready(Ok(response))
    }
}

const BODY: &[u8] = br#"{"amount":1000,"currency":"usd"}"#;

fn request(header: &'static str, n: u64) -> Request<Full<Bytes>> {
    Request::post("/payments")
        .header(header, HeaderValue::from(n))
        .body(Full::new(Bytes::from_static(BODY)))
        .unwrap()
}

async fn drive<S, B>(service: &mut S, request: Request<Full<Bytes>>) -> usize
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

fn main() {
    let spec = std::env::var("LAYER_COUNT").expect("LAYER_COUNT=PATH:N");
    let (path, n) = spec.split_once(':').expect("LAYER_COUNT=PATH:N");
    let n: u64 = n.parse().expect("N requests");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handler = Handler(payload());
    rt.block_on(async {
        let store = idempotent::memory::MemoryStore::builder()
            .try_build()
            .expect("a runtime for the store's task");
        let mut layered =
            idempotent::middleware::IdempotencyLayer::new(store).layer(handler.clone());
        match path {
            "bare_handler" => {
                let mut service = handler.clone();
                for i in 0..n {
                    drive(&mut service, request("x-other", i)).await;
                }
            }
            "passthrough_no_key" => {
                for i in 0..n {
                    drive(&mut layered, request("x-other", i)).await;
                }
            }
            "first_request_fresh_key" => {
                for i in 0..n {
                    drive(&mut layered, request("idempotency-key", i)).await;
                }
            }
            "replay" => {
                for _ in 0..=n {
                    drive(&mut layered, request("idempotency-key", 1)).await;
                }
                let response = ServiceExt::<Request<Full<Bytes>>>::ready(&mut layered)
                    .await
                    .unwrap()
                    .call(request("idempotency-key", 1))
                    .await
                    .unwrap();
                assert_eq!(
                    response.headers()["idempotent-replayed"],
                    "true",
                    "the peer replays (its handler ran once)"
                );
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, handler.0, "the whole stored answer");
            }
            other => panic!("unknown path {other}"),
        }
    });
}
