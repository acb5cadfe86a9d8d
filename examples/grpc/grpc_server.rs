//! A gRPC payments service (tonic) guarded by `tower-idempotency`: idempotent unary calls.
//!
//! ```text
//! cargo run --example grpc_server -- [--addr HOST:PORT] [--store memory|redis://…|postgres://…]
//!                                     [--max-stored-body BYTES]
//! ```
//!
//! * `payments.v1.Payments/Create(CreatePaymentRequest) returns (Payment)`: metadata
//!   `authorization: Bearer <tenant>` (checked before the idempotency layer:
//!   `UNAUTHENTICATED` without it; keys are scoped by tenant) and `idempotency-key: <key>`.
//!   `fail: true` answers `INTERNAL` after counting an execution; `delay_ms` sleeps first;
//!   `receipt_bytes` adds a receipt of that many bytes to the `Payment` (an answer of several
//!   MiB: one larger than `--max-stored-body` is not stored, and its retry is
//!   `FAILED_PRECONDITION`, never a second run).
//! * `payments.v1.Payments/Stats(StatsRequest) returns (Stats)`: how many times `Create` ran.
//! * `payments.v1.Payments/Ticks(TicksRequest) returns (stream Tick)`: a server stream, which
//!   the idempotency layer lets through (it carries no key).
//!
//! The protocol is `examples/grpc/proto/payments.proto`; its messages are written out by hand
//! in `examples/grpc/payments.rs` (as prost derives them) and the service over tonic's server
//! API: no `protoc` needed to build. `examples/grpc/grpc_client.rs` is a client. Prints
//! `listening on http://IP:PORT` when ready; SIGTERM or Ctrl-C stops it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use clap::Parser;
use tonic::{Code, Status};
use tower::{service_fn, ServiceBuilder};
use tower_idempotency::store::{BoxStore, MemoryStore, PostgresStore, RedisStore};
use tower_idempotency::IdempotencyLayer;

#[path = "payments.rs"]
mod payments;
use payments::{CreatePaymentRequest, Payment, Stats, StatsRequest, Tick, TicksRequest};

#[derive(Parser, Debug)]
#[command(about = "gRPC payments service behind tower-idempotency")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: SocketAddr,
    /// Where records live: `memory`, `redis://HOST:PORT` or `postgres://USER@HOST:PORT/DB`.
    #[arg(long, default_value = "memory")]
    store: String,
    /// The largest answer stored for replay, in bytes (the layer's `max_stored_body`).
    #[arg(long, default_value_t = tower_idempotency::defaults::MAX_STORED_BODY)]
    max_stored_body: usize,
}

#[derive(Clone)]
struct Tenant(String);

type Codec<Req, Res> = tonic_prost::ProstCodec<Res, Req>;

/// Checks `authorization: Bearer <tenant>` before the idempotency layer, as a gRPC service
/// would in an interceptor-like layer: `UNAUTHENTICATED` without it.
async fn authenticate(mut request: Request, next: Next) -> Response {
    let tenant = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    match tenant {
        Some(tenant) => {
            request.extensions_mut().insert(Tenant(tenant));
            next.run(request).await
        }
        None => Status::unauthenticated("send authorization: Bearer <tenant>")
            .into_http::<axum::body::Body>()
            .into_response(),
    }
}

async fn create(
    Extension(executions): Extension<Arc<AtomicU64>>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    request: Request,
) -> Response {
    let service = service_fn(move |call: tonic::Request<CreatePaymentRequest>| {
        let (executions, tenant) = (executions.clone(), tenant.clone());
        async move {
            executions.fetch_add(1, Ordering::SeqCst);
            let message = call.into_inner();
            if message.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(u64::from(message.delay_ms))).await;
            }
            if message.fail {
                return Err(Status::new(Code::Internal, "simulated failure"));
            }
            let receipt = (0..message.receipt_bytes).map(|i| i as u8).collect();
            Ok(tonic::Response::new(Payment {
                id: format!("pay_{}", uuid::Uuid::new_v4().simple()),
                amount: message.amount,
                currency: message.currency,
                tenant,
                receipt,
            }))
        }
    });
    tonic::server::Grpc::new(Codec::<CreatePaymentRequest, Payment>::default())
        .unary(service, request)
        .await
        .into_response()
}

async fn stats(Extension(executions): Extension<Arc<AtomicU64>>, request: Request) -> Response {
    let service = service_fn(move |_: tonic::Request<StatsRequest>| {
        let executions = executions.load(Ordering::SeqCst);
        async move { Ok::<_, Status>(tonic::Response::new(Stats { executions })) }
    });
    tonic::server::Grpc::new(Codec::<StatsRequest, Stats>::default())
        .unary(service, request)
        .await
        .into_response()
}

async fn ticks(request: Request) -> Response {
    let service = service_fn(|call: tonic::Request<TicksRequest>| async move {
        let ticks = (1..=call.into_inner().count).map(|n| Ok(Tick { n }));
        Ok::<_, Status>(tonic::Response::new(tokio_stream::iter(ticks)))
    });
    tonic::server::Grpc::new(Codec::<TicksRequest, Tick>::default())
        .server_streaming(service, request)
        .await
        .into_response()
}

async fn open_store(spec: &str) -> Result<BoxStore, Box<dyn std::error::Error>> {
    if spec == "memory" {
        Ok(BoxStore::new(MemoryStore::new()))
    } else if spec.starts_with("redis://") {
        Ok(BoxStore::new(RedisStore::connect(spec).await?))
    } else if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        let store = PostgresStore::connect(spec).await?;
        store.migrate().await?;
        Ok(BoxStore::new(store))
    } else {
        Err(format!("unsupported --store {spec:?}: use memory, redis://… or postgres://…").into())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let idempotency = IdempotencyLayer::with_store(open_store(&args.store).await?)
        .max_stored_body(args.max_stored_body)
        .scope(|parts| parts.extensions.get::<Tenant>().map(|t| t.0.clone()));
    let drain = idempotency.settings().drain_handle();
    let executions = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route(payments::CREATE, post(create))
        .route(payments::STATS, post(stats))
        .route(payments::TICKS, post(ticks))
        .layer(
            ServiceBuilder::new()
                .layer(Extension(executions))
                .layer(middleware::from_fn(authenticate)) // 1. who is calling
                .layer(idempotency), // 2. one outcome per (tenant, key)
        )
        .fallback(|| async {
            let mut response =
                Status::unimplemented("no such method").into_http::<axum::body::Body>();
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            response.into_response()
        });
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    std::io::Write::flush(&mut std::io::stdout())?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            drain.start();
        })
        .await?;
    Ok(())
}
