//! Operator tools against the layer: the public key builder names the layer's own record, and
//! deleting it lets the next request run.

use crate::support;

use http::{Method, StatusCode};
use support::{app, request, send};
use tower_idempotency::admin;
use tower_idempotency::store::{KeyState, MemoryStore, Store};
use tower_idempotency::IdempotencyLayer;

#[derive(Clone)]
struct Tenant(&'static str);

#[tokio::test]
async fn an_operator_finds_inspects_and_deletes_a_requests_record() {
    let store = MemoryStore::new();
    let layer = IdempotencyLayer::with_store(store.clone())
        .scope(|parts| parts.extensions.get::<Tenant>().map(|t| t.0.to_owned()));
    let (mut app, probe) = app(layer);
    let keyed = || {
        let mut r = request(Some("\"order 42\""), "{}", &[]);
        r.extensions_mut().insert(Tenant("acme"));
        r
    };
    assert_eq!(send(&mut app, keyed()).await.status, 201);

    let key = admin::http_key("acme", &Method::POST, "/payments", "order 42");
    match store.inspect(&key).await.unwrap() {
        KeyState::Completed { record, expires_in } => {
            assert_eq!(admin::response_status(&record), Some(StatusCode::CREATED));
            assert!(expires_in.is_some());
        }
        other => panic!("expected the stored response, got {other:?}"),
    }
    assert!(matches!(
        store
            .inspect(&admin::http_key(
                "globex",
                &Method::POST,
                "/payments",
                "order 42"
            ))
            .await
            .unwrap(),
        KeyState::Absent
    ));
    assert!(send(&mut app, keyed()).await.replayed());
    assert!(store.delete(&key).await.unwrap());
    let again = send(&mut app, keyed()).await;
    assert!(!again.replayed(), "deleted: the next request runs");
    assert_eq!(probe.executions(), 2);
}
