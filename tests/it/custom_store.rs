//! The `custom_store` example passes the conformance suite, as its docs promise.

#[path = "../../examples/custom_store.rs"]
#[allow(dead_code)]
mod example;

use example::HashMapStore;

tower_idempotency::store_conformance_tests!(hash_map_store, async { HashMapStore::default() });

/// The example's store works behind the layer.
#[tokio::test]
async fn the_custom_store_guards_requests() {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::{Service, ServiceExt};

    let mut service = tower::ServiceBuilder::new()
        .layer(tower_idempotency::IdempotencyLayer::with_store(
            HashMapStore::default(),
        ))
        .service_fn(
            |_req: http::Request<tower_idempotency::RequestBody<Body>>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Body::from(fastrand_id())))
            },
        );
    let request = || {
        http::Request::post("/x")
            .header("idempotency-key", "k")
            .body(Body::from("{}"))
            .unwrap()
    };
    let first = service
        .ready()
        .await
        .unwrap()
        .call(request())
        .await
        .unwrap();
    let retry = service
        .ready()
        .await
        .unwrap()
        .call(request())
        .await
        .unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(
        first.into_body().collect().await.unwrap().to_bytes(),
        retry.into_body().collect().await.unwrap().to_bytes()
    );
}

fn fastrand_id() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}
