//! A small client of the gRPC example: creates one payment, retries it with the same key, and
//! shows that the retry got the stored answer (the same payment id, `idempotent-replayed:
//! true`) and that the service ran once.
//!
//! ```text
//! cargo run --example grpc_server &
//! cargo run --example grpc_client -- [--server http://127.0.0.1:50051] [--tenant acme] [--key KEY]
//! ```
//!
//! The protocol is `examples/grpc/proto/payments.proto`; this client uses the hand-written
//! messages of `payments.rs` and tonic's generic client (no `protoc` needed).

use clap::Parser;
use http::uri::PathAndQuery;
use tonic::transport::Channel;

#[path = "payments.rs"]
mod payments;
use payments::{CreatePaymentRequest, Payment, Stats, StatsRequest};

#[derive(Parser, Debug)]
#[command(about = "Creates a payment twice with one idempotency key")]
struct Args {
    /// The server's URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Sent as `authorization: Bearer <tenant>`.
    #[arg(long, default_value = "acme")]
    tenant: String,
    /// The idempotency key [a new UUID v4].
    #[arg(long)]
    key: Option<String>,
    /// The amount, in minor units.
    #[arg(long, default_value_t = 1000)]
    amount: i64,
}

fn request<T>(message: T, tenant: &str, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let metadata = request.metadata_mut();
    let bearer = format!("Bearer {tenant}");
    metadata.insert("authorization", bearer.parse().expect("a header value"));
    if let Some(key) = key {
        metadata.insert("idempotency-key", key.parse().expect("a header value"));
    }
    request
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let key = args.key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let channel = Channel::from_shared(args.server)?.connect().await?;
    let mut client = tonic::client::Grpc::new(channel);
    let message = CreatePaymentRequest {
        amount: args.amount,
        currency: "usd".into(),
        fail: false,
        delay_ms: 0,
        receipt_bytes: 0,
    };
    for attempt in ["first call", "retry"] {
        client.ready().await?;
        let response: tonic::Response<Payment> = client
            .unary(
                request(message.clone(), &args.tenant, Some(&key)),
                PathAndQuery::from_static(payments::CREATE),
                tonic_prost::ProstCodec::default(),
            )
            .await?;
        let replayed = response
            .metadata()
            .get("idempotent-replayed")
            .is_some_and(|value| value == "true");
        let payment = response.into_inner();
        println!(
            "{attempt}: payment {} ({} {}), replayed: {replayed}",
            payment.id, payment.amount, payment.currency
        );
    }
    client.ready().await?;
    let stats: tonic::Response<Stats> = client
        .unary(
            request(StatsRequest {}, &args.tenant, None),
            PathAndQuery::from_static(payments::STATS),
            tonic_prost::ProstCodec::default(),
        )
        .await?;
    println!(
        "Create ran {} time(s) on this server",
        stats.into_inner().executions
    );
    Ok(())
}
