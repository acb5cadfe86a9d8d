//! The counting mode of `benches/layer.rs` (`LAYER_COUNT=PATH:N`) through the `idempotent`
//! crate 2.0's tower layer on its memory store: the same ~1 KiB handler, the same requests (a
//! POST with a 32-byte body and one header from a counter), the same current-thread runtime,
//! so that `benches/timed.sh` and `benches/instructions.sh` time and count it as they do this
//! crate's paths (`BIN=` this binary). Paths: `bare_handler`, `passthrough_no_key`, `replay`,
//! `first_request_fresh_key` (its store is unbounded, so it never evicts).

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};

#[path = "../../driven.rs"]
mod driven;
use driven::{drive, payload, request, Handler};

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
