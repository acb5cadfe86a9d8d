//! The README's axum example: authentication first, then the idempotency layer, scoped by
//! tenant, with a log subscriber so that the layer's messages (a wrong layer order among them)
//! are seen.
//!
//! ```text
//! cargo run --example axum_quickstart
//! curl -si localhost:3000/payments -H 'Authorization: Bearer acme' -H 'Idempotency-Key: k1' -d 'hi'
//! ```
//!
//! The README shows this file from `use` on; `tests/docs_links.rs` keeps the two the same.

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::{routing::post, Router};
use tower::ServiceBuilder;
use tower_idempotency::IdempotencyLayer;

#[derive(Clone)]
struct Tenant(String);

async fn authenticate(mut request: Request, next: Next) -> Result<Response, StatusCode> {
    let tenant = request
        .headers()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or(StatusCode::UNAUTHORIZED)?
        .to_owned();
    request.extensions_mut().insert(Tenant(tenant));
    Ok(next.run(request).await)
}

async fn create_payment(body: String) -> (StatusCode, String) {
    // Charge the card exactly once per key...
    (StatusCode::CREATED, body)
}

#[tokio::main]
async fn main() {
    // The layer logs through `tracing`: without a subscriber its messages (a keyed request
    // refused because authentication ran after it, with the fix) are lost.
    tracing_subscriber::fmt::init();

    let idempotency = IdempotencyLayer::new().scope(|parts| {
        parts
            .extensions
            .get::<Tenant>()
            .map(|tenant| tenant.0.clone())
    });
    let app = Router::new()
        .route("/payments", post(create_payment))
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn(authenticate)) // 1. who is calling
                .layer(idempotency), // 2. one outcome per (tenant, key)
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000")
        .await
        .unwrap();
    println!("listening on http://127.0.0.1:3000");
    axum::serve(listener, app).await.unwrap();
}
