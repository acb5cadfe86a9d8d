//! Records that share the handler's body (issue 44): the memory store keeps the response head
//! encoded and the body as the handler's bytes, and never builds the sealed payload; a store
//! that serialises gets that payload from `Record::payload()`. Replays from either are the
//! same, byte for byte, for every response shape.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use proptest::prelude::*;
use tower::{Service, ServiceExt};
use tower_idempotency::store::{
    ClaimOutcome, MemoryStore, OwnerToken, Record, RecoveryPoint, Store, StoreError,
};
use tower_idempotency::{IdempotencyLayer, RequestBody};

/// A memory store behind which every completed record goes through its serialised form, as a
/// remote store's would: what `complete` keeps is `Record::new(fingerprint, payload())`, a copy
/// of the sealed bytes (so their checksum is read back, not assumed).
#[derive(Clone, Default)]
struct Serialising {
    inner: MemoryStore,
    payloads: Arc<Mutex<HashMap<String, Bytes>>>,
}

impl Store for Serialising {
    async fn claim_as(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        self.inner.claim_as(key, token, lease).await
    }

    async fn renew(
        &self,
        key: &str,
        token: &OwnerToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &str,
        token: &OwnerToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let payload = Bytes::copy_from_slice(record.payload());
        self.payloads
            .lock()
            .unwrap()
            .insert(key.to_owned(), payload.clone());
        let copy = Record::new(record.fingerprint(), payload);
        self.inner.complete(key, token, copy, ttl).await
    }

    async fn release(&self, key: &str, token: &OwnerToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }

    async fn save_point(
        &self,
        key: &str,
        token: &OwnerToken,
        point: &RecoveryPoint,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.save_point(key, token, point, ttl).await
    }
}

/// A response the handler gives: status, headers, body chunks, trailers.
#[derive(Debug, Clone)]
struct Shape {
    status: u16,
    headers: Vec<(String, String)>,
    chunks: Vec<Vec<u8>>,
    trailers: Option<Vec<(String, String)>>,
}

impl Shape {
    fn response(&self) -> Response<Body> {
        let mut frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = self
            .chunks
            .iter()
            .map(|c| Ok(http_body::Frame::data(Bytes::from(c.clone()))))
            .collect();
        if let Some(trailers) = &self.trailers {
            let mut map = HeaderMap::new();
            for (name, value) in trailers {
                map.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            frames.push(Ok(http_body::Frame::trailers(map)));
        }
        let body = Body::new(StreamBody::new(futures_util::stream::iter(frames)));
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::from_u16(self.status).unwrap();
        for (name, value) in &self.headers {
            response.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        response
    }
}

/// What a client sees of a response: status, every header in order, the body's bytes, trailers,
/// and the body's frames that hold data (where its chunk boundaries fall).
type Seen = (
    StatusCode,
    Vec<(String, Vec<u8>)>,
    Bytes,
    Option<HeaderMap>,
    Vec<Bytes>,
);

async fn seen(response: Response<tower_idempotency::ResponseBody<Body>>) -> Seen {
    let status = response.status();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
    let mut body = response.into_body();
    let (mut frames, mut trailers) = (Vec::new(), None);
    while let Some(frame) = body.frame().await {
        match frame.unwrap().into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => frames.push(data),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    (status, headers, frames.concat().into(), trailers, frames)
}

/// The original's answer and a retry's replay of `shape` through a layer over `store`.
async fn original_and_replay<S>(store: S, shape: &Shape, max_body: usize) -> (Seen, Seen)
where
    S: Store + Clone + Send + Sync + 'static,
{
    let shape = shape.clone();
    let mut service = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::with_store(store).max_stored_body(max_body))
        .service_fn(move |_req: Request<RequestBody<Body>>| {
            let response = shape.response();
            async move { Ok::<_, Infallible>(response) }
        });
    let request = || {
        Request::post("/payments")
            .header("idempotency-key", "k-1")
            .header("x-request-id", "req-7")
            .body(Body::from("{\"amount\":1}"))
            .unwrap()
    };
    let first = send(&mut service, request()).await;
    let first = seen(first).await;
    let retry = send(&mut service, request()).await;
    (first, seen(retry).await)
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("content-type".to_owned()),
        Just("set-cookie".to_owned()),
        Just("etag".to_owned()),
        Just("x-custom".to_owned()),
        "x-[a-z]{1,8}",
    ]
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        prop_oneof![Just(200u16), Just(201), Just(202)],
        proptest::collection::vec((header_name(), "[ -~]{0,24}"), 0..6),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..5),
        proptest::option::of(proptest::collection::vec(
            (
                prop_oneof![Just("grpc-status".to_owned()), "x-t[a-z]{0,4}"],
                "[0-9a-z]{0,6}",
            ),
            0..3,
        )),
    )
        .prop_map(|(status, headers, chunks, trailers)| Shape {
            status,
            headers,
            chunks,
            trailers,
        })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Every shape (any status stored, repeated headers, empty, one or many chunks, trailers,
    /// a body over the limit so only its head is kept) replays the same from the memory store's
    /// shared record as from its serialised payload; and the original is answered unchanged.
    #[test]
    fn a_shared_record_replays_as_its_serialised_payload(shape in shape(), small_limit in any::<bool>()) {
        let max_body = if small_limit { 200 } else { 1 << 20 };
        runtime().block_on(async {
            let (first_mem, replay_mem) =
                original_and_replay(MemoryStore::new(), &shape, max_body).await;
            let serialising = Serialising::default();
            let (first_ser, replay_ser) =
                original_and_replay(serialising.clone(), &shape, max_body).await;
            prop_assert_eq!(&first_mem, &first_ser);
            prop_assert_eq!(&replay_mem, &replay_ser);
            let total: usize = shape.chunks.iter().map(Vec::len).sum();
            let replayed = replay_mem.1.iter().any(|(n, _)| n == "idempotent-replayed");
            prop_assert!(replayed, "the retry is a replay");
            let omitted = replay_mem.1.iter().any(|(n, _)| n == "idempotent-body-omitted");
            prop_assert_eq!(omitted, total > max_body);
            if !omitted {
                prop_assert_eq!(&replay_mem.2, &first_mem.2, "the body replays whole");
                prop_assert_eq!(&replay_mem.3, &first_mem.3, "and its trailers");
                prop_assert_eq!(&replay_mem.4, &first_mem.4, "one frame per original chunk");
            }
            // The payload the serialising store kept is the sealed format: version 4 (with a
            // chunk table) for a body kept in several chunks, else version 3.
            let payloads = serialising.payloads.lock().unwrap();
            let payload = payloads.values().next().expect("one record kept");
            let version = if !omitted && first_mem.4.len() > 1 { 4 } else { 3 };
            prop_assert_eq!(&payload[..3], &[b'T', b'I', version][..]);
            Ok(())
        })?;
    }
}

/// `request`'s answer from `service`.
async fn send<S>(service: &mut S, request: Request<Body>) -> S::Response
where
    S: Service<Request<Body>>,
    S::Error: std::fmt::Debug,
{
    service.ready().await.unwrap().call(request).await.unwrap()
}

/// The memory store keeps the handler's body as the handler's bytes when the handler gave them
/// to the response alone (a body built for this request, as a JSON handler's is): a replay
/// answers that very allocation (no copy into a sealed payload, none out of it).
#[tokio::test]
async fn a_memory_store_replay_answers_the_handlers_own_bytes() {
    let given = Arc::new(Mutex::new(0usize));
    let seen = given.clone();
    let mut service = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::with_store(MemoryStore::new()))
        .service_fn(move |_req: Request<RequestBody<Body>>| {
            let body = Bytes::from(vec![b'x'; 1024]);
            *seen.lock().unwrap() = body.as_ptr() as usize;
            async move { Ok::<_, Infallible>(Response::new(Body::from(body))) }
        });
    let request = || {
        Request::post("/payments")
            .header("idempotency-key", "k-shared")
            .body(Body::empty())
            .unwrap()
    };
    let first = send(&mut service, request()).await;
    first.into_body().collect().await.unwrap();
    let retry = send(&mut service, request()).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let mut body = retry.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    let data = frame.into_data().unwrap();
    assert_eq!(data.len(), 1024);
    assert_eq!(
        data.as_ptr() as usize,
        *given.lock().unwrap(),
        "the replayed body is the handler's bytes, not a copy"
    );
}

/// A body that is a slice of a larger buffer someone else holds (a proxy's read buffer, a
/// cached document) is copied into the record: the memory store never keeps a whole buffer
/// alive for the few bytes it charges.
#[tokio::test]
async fn a_stored_body_never_pins_the_buffer_it_was_sliced_from() {
    let big = Bytes::from(vec![b'y'; 1 << 20]);
    // The handler hands its one slice over and keeps nothing.
    let slice = Arc::new(Mutex::new(Some(big.slice(..16))));
    let mut service = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::with_store(MemoryStore::new()))
        .service_fn(move |_req: Request<RequestBody<Body>>| {
            let body = slice.lock().unwrap().take().expect("the handler runs once");
            async move { Ok::<_, Infallible>(Response::new(Body::from(body))) }
        });
    let request = || {
        Request::post("/payments")
            .header("idempotency-key", "k-slice")
            .body(Body::empty())
            .unwrap()
    };
    let first = send(&mut service, request()).await;
    let answered = first.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(answered, big.slice(..16));
    drop(answered);
    let mut big = big;
    assert!(
        big.is_unique(),
        "the stored record holds a slice of the 1 MiB buffer it charged 16 bytes for"
    );
    big.truncate(16);
    let retry = send(&mut service, request()).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.into_body().collect().await.unwrap().to_bytes(), big);
}

/// The memory store's capacity charges a shared record for its body: a store of 1 MiB filled
/// with 64 KiB bodies through the layer holds no more of them than fit in 1 MiB.
#[tokio::test]
async fn shared_bodies_are_charged_to_the_memory_store_capacity() {
    const BODY: usize = 64 * 1024;
    const CAPACITY: u64 = 1024 * 1024;
    let store = MemoryStore::builder().max_bytes(CAPACITY).build();
    let mut service = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::with_store(store.clone()))
        .service_fn(|_req: Request<RequestBody<Body>>| async {
            Ok::<_, Infallible>(Response::new(Body::from(vec![7u8; BODY])))
        });
    for i in 0..64 {
        let request = Request::post("/payments")
            .header("idempotency-key", format!("k-{i}"))
            .body(Body::empty())
            .unwrap();
        let response = send(&mut service, request).await;
        response.into_body().collect().await.unwrap();
    }
    let held = store.record_count();
    let weight = store.weighted_size();
    assert!(weight <= CAPACITY, "charged {weight} over the capacity");
    assert!(
        held * BODY as u64 <= CAPACITY,
        "{held} bodies of {BODY} bytes held in {CAPACITY}"
    );
    assert!(held >= 8, "the store keeps what fits: {held}");
    assert!(
        weight >= held * BODY as u64,
        "each record is charged its body: {weight} for {held}"
    );
}
