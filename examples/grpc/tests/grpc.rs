//! The gRPC example (a tonic service behind the layer) driven by a real tonic client over
//! loopback: for a gRPC client it behaves as the HTTP demo does for an HTTP client.

#[path = "../../../tests/it/support/demo.rs"]
mod demo;

use std::process::Child;
use std::sync::Arc;

use http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

#[path = "../payments.rs"]
mod payments;
use payments::{CreatePaymentRequest, Payment, Stats, StatsRequest, Tick, TicksRequest};

/// The example server as a child process, killed on drop.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    async fn start_with(args: &[&str]) -> Self {
        let binary = demo::example_binary("grpc_server");
        let (child, base) = demo::spawn_listening(&binary, args).await;
        Self { child, base }
    }

    async fn client(&self) -> tonic::client::Grpc<Channel> {
        let channel = Channel::from_shared(self.base.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        tonic::client::Grpc::new(channel)
    }
}

fn codec<Req, Res>() -> tonic_prost::ProstCodec<Req, Res> {
    tonic_prost::ProstCodec::default()
}

fn payment(amount: i64) -> CreatePaymentRequest {
    CreatePaymentRequest {
        amount,
        currency: "usd".into(),
        fail: false,
        delay_ms: 0,
        receipt_bytes: 0,
    }
}

fn request<T>(message: T, tenant: &str, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let metadata = request.metadata_mut();
    metadata.insert("authorization", format!("Bearer {tenant}").parse().unwrap());
    if let Some(key) = key {
        metadata.insert("idempotency-key", key.parse().unwrap());
    }
    request
}

async fn create(
    client: &mut tonic::client::Grpc<Channel>,
    key: Option<&str>,
    message: CreatePaymentRequest,
) -> Result<tonic::Response<Payment>, Status> {
    client.ready().await.unwrap();
    client
        .unary(
            request(message, "acme", key),
            PathAndQuery::from_static(payments::CREATE),
            codec(),
        )
        .await
}

async fn executions(client: &mut tonic::client::Grpc<Channel>) -> u64 {
    client.ready().await.unwrap();
    let stats: tonic::Response<Stats> = client
        .unary(
            request(StatsRequest {}, "acme", None),
            PathAndQuery::from_static(payments::STATS),
            codec(),
        )
        .await
        .unwrap();
    stats.into_inner().executions
}

fn replayed<T>(response: &tonic::Response<T>) -> bool {
    response
        .metadata()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

#[tokio::test]
async fn a_retry_replays_the_first_payment() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let first = create(&mut client, Some("k-1"), payment(500))
        .await
        .unwrap();
    assert!(!replayed(&first));
    let retry = create(&mut client, Some("k-1"), payment(500))
        .await
        .unwrap();
    assert!(
        replayed(&retry),
        "the replay carries idempotent-replayed: true"
    );
    assert_eq!(
        retry.get_ref(),
        first.get_ref(),
        "the same Payment, same id"
    );
    assert_eq!(executions(&mut client).await, 1);
}

#[tokio::test]
async fn another_message_with_the_same_key_is_invalid_argument() {
    let server = Server::start().await;
    let mut client = server.client().await;
    create(&mut client, Some("k-2"), payment(500))
        .await
        .unwrap();
    let status = create(&mut client, Some("k-2"), payment(999))
        .await
        .expect_err("another message with this key");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("key-reused"), "{status:?}");
    assert_eq!(executions(&mut client).await, 1);
}

/// A failed call (`INTERNAL`, HTTP 200 with a non-zero grpc-status) is not stored: the key is
/// released and the retry runs.
#[tokio::test]
async fn a_failed_call_is_not_stored_and_the_retry_runs() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let failing = CreatePaymentRequest {
        fail: true,
        ..payment(700)
    };
    let status = create(&mut client, Some("k-3"), failing.clone())
        .await
        .expect_err("the handler fails");
    assert_eq!(status.code(), Code::Internal);
    let status = create(&mut client, Some("k-3"), failing)
        .await
        .expect_err("the retry ran, and failed again");
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(
        executions(&mut client).await,
        2,
        "a failure is never replayed"
    );
}

/// Twenty concurrent duplicates: exactly one execution, the others `ABORTED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_run_once_and_the_rest_are_aborted() {
    const CALLS: usize = 20;
    let server = Server::start().await;
    let barrier = Arc::new(tokio::sync::Barrier::new(CALLS));
    let mut tasks = Vec::new();
    for _ in 0..CALLS {
        let (mut client, barrier) = (server.client().await, barrier.clone());
        tasks.push(tokio::spawn(async move {
            let slow = CreatePaymentRequest {
                delay_ms: 500,
                ..payment(100)
            };
            barrier.wait().await;
            create(&mut client, Some("k-herd"), slow).await
        }));
    }
    let (mut ok, mut aborted) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) if status.code() == Code::Aborted => aborted += 1,
            Err(status) => panic!("{status:?}"),
        }
    }
    assert_eq!((ok, aborted), (1, CALLS - 1));
    let mut client = server.client().await;
    assert_eq!(executions(&mut client).await, 1);
}

/// Streams are not buffered nor stored: a server-streaming call without a key passes through.
#[tokio::test]
async fn a_streaming_call_passes_through() {
    let server = Server::start().await;
    let mut client = server.client().await;
    client.ready().await.unwrap();
    let response = client
        .server_streaming(
            request(TicksRequest { count: 3 }, "acme", None),
            PathAndQuery::from_static(payments::TICKS),
            codec::<TicksRequest, Tick>(),
        )
        .await
        .unwrap();
    let mut stream = response.into_inner();
    let mut ticks = Vec::new();
    while let Some(tick) = stream.message().await.unwrap() {
        ticks.push(tick.n);
    }
    assert_eq!(ticks, [1, 2, 3]);
}

#[tokio::test]
async fn bad_keys_and_missing_credentials_are_grpc_errors() {
    let server = Server::start().await;
    let mut client = server.client().await;
    let status = create(&mut client, Some("a,b"), payment(1))
        .await
        .expect_err("a comma in a bare key");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    client.ready().await.unwrap();
    let mut anonymous = tonic::Request::new(payment(1));
    anonymous
        .metadata_mut()
        .insert("idempotency-key", "k-anon".parse().unwrap());
    let status = client
        .unary::<_, Payment, _>(
            anonymous,
            PathAndQuery::from_static(payments::CREATE),
            codec(),
        )
        .await
        .expect_err("no credentials");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(executions(&mut client).await, 0);
}

/// `examples/grpc/grpc_client.rs`, run against the server: its retry is a replay of its first
/// call, and `Create` ran once.
#[tokio::test]
async fn the_client_example_sees_its_retry_replayed() {
    let server = Server::start().await;
    let binary = demo::example_binary("grpc_client");
    let output = tokio::process::Command::new(binary)
        .args(["--server", &server.base, "--key", "client-example-1"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let ids: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.split("payment ").nth(1)?.split(' ').next())
        .collect();
    assert_eq!(ids.len(), 2, "{stdout}");
    assert_eq!(ids[0], ids[1], "{stdout}");
    assert!(
        stdout.contains("retry: payment") && stdout.contains("replayed: true"),
        "{stdout}"
    );
    assert!(stdout.contains("Create ran 1 time(s)"), "{stdout}");
}

/// A client that takes answers of up to 16 MiB (tonic's default is 4 MiB).
async fn large_client(server: &Server) -> tonic::client::Grpc<Channel> {
    server.client().await.max_decoding_message_size(16 << 20)
}

fn with_receipt(amount: i64, receipt_bytes: u32) -> CreatePaymentRequest {
    CreatePaymentRequest {
        receipt_bytes,
        ..payment(amount)
    }
}

/// A 4 MiB answer (tonic's default message limit) is within the default `max_stored_body`
/// (8 MiB): it is stored whole and its retry replays it whole, the same `Payment`.
#[tokio::test]
async fn a_4_mib_answer_is_stored_and_replayed_whole() {
    let server = Server::start().await;
    let mut client = large_client(&server).await;
    let message = with_receipt(400, 4 << 20);
    let first = create(&mut client, Some("k-4mib"), message.clone())
        .await
        .unwrap();
    assert_eq!(first.get_ref().receipt.len(), 4 << 20);
    let retry = create(&mut client, Some("k-4mib"), message).await.unwrap();
    assert!(replayed(&retry));
    assert_eq!(
        retry.get_ref(),
        first.get_ref(),
        "the same Payment, receipt and all"
    );
    assert_eq!(executions(&mut client).await, 1);
}

/// An answer past `max_stored_body` reaches the original whole; the key keeps a record of its
/// head, and every retry is `FAILED_PRECONDITION` saying so: the call succeeded and is never
/// run a second time. Another message under the key is still `INVALID_ARGUMENT`.
#[tokio::test]
async fn an_answer_past_the_bound_is_never_run_twice() {
    let server = Server::start_with(&["--max-stored-body", "1048576"]).await;
    let mut client = large_client(&server).await;
    let message = with_receipt(500, 2 << 20);
    let first = create(&mut client, Some("k-big"), message.clone())
        .await
        .unwrap();
    assert!(!replayed(&first));
    assert_eq!(
        first.get_ref().receipt.len(),
        2 << 20,
        "the original gets all of it"
    );
    for _ in 0..3 {
        let status = create(&mut client, Some("k-big"), message.clone())
            .await
            .expect_err("the answer was not stored");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("answer-not-stored"), "{status:?}");
    }
    let status = create(&mut client, Some("k-big"), with_receipt(501, 2 << 20))
        .await
        .expect_err("another message");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(executions(&mut client).await, 1, "never run a second time");
}

/// Past the bound, a call that failed is not kept, as within it: the key is released and the
/// retry runs.
#[tokio::test]
async fn a_failed_call_past_the_bound_is_released() {
    let server = Server::start_with(&["--max-stored-body", "4096"]).await;
    let mut client = large_client(&server).await;
    let failing = CreatePaymentRequest {
        fail: true,
        ..with_receipt(600, 1 << 20)
    };
    for _ in 0..2 {
        let status = create(&mut client, Some("k-big-fail"), failing.clone())
            .await
            .expect_err("the handler fails");
        assert_eq!(status.code(), Code::Internal, "{status:?}");
    }
    assert_eq!(executions(&mut client).await, 2);
}
