//! Request fingerprints: xxh3-128 over the query string and the whole body, hashed as it streams.
//!
//! A duplicate must carry the same request as the original, or it is refused with 422. The
//! layer compares a 128-bit \[xxh3\] fingerprint of the two requests. By default it covers the
//! query string and the **whole** body, never the headers (they differ between retries:
//! dates, tracing ids, auth tokens being refreshed).
//!
//! The body is never buffered: the handler receives a [`RequestBody`](crate::RequestBody) that hashes each chunk
//! as it passes. Should the handler stop reading early, the layer reads out and hashes the rest
//! after the handler answered, so the fingerprint always covers the whole body. A duplicate's
//! body is read out and hashed the same way before it is judged.
//!
//! What feeds the fingerprint is a choice ([`Fingerprint`]):
//!
//! ```
//! use tower_idempotency::{Fingerprint, IdempotencyLayer};
//!
//! // The default: query string and body.
//! let layer = IdempotencyLayer::new().fingerprint(Fingerprint::query_and_body());
//! // Body, plus a header that changes the meaning of the request.
//! let layer = IdempotencyLayer::new().fingerprint(Fingerprint::custom(|parts, hasher| {
//!     hasher.update(parts.uri.query().unwrap_or("").as_bytes());
//!     if let Some(version) = parts.headers.get("api-version") {
//!         hasher.update(version.as_bytes());
//!     }
//! }));
//! // No check at all: any duplicate replays the original.
//! let layer = IdempotencyLayer::new().fingerprint(Fingerprint::disabled());
//! # let _ = layer;
//! ```

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Buf;
use http::request::Parts;
use http_body::Body;
use xxhash_rust::xxh3::Xxh3;

use crate::BoxError;

type HeadFn = dyn Fn(&Parts, &mut FingerprintHasher) + Send + Sync;

/// What feeds a request's fingerprint. See the [module docs](self).
#[derive(Clone)]
pub struct Fingerprint {
    head: Option<Arc<HeadFn>>,
    body: bool,
    enabled: bool,
}

impl Fingerprint {
    /// The query string and the whole body (the default).
    pub fn query_and_body() -> Self {
        Self::custom(|parts, hasher| hasher.update(parts.uri.query().unwrap_or("").as_bytes()))
    }

    /// The whole body only.
    pub fn body_only() -> Self {
        Self {
            head: None,
            body: true,
            enabled: true,
        }
    }

    /// Whatever `head` feeds from the request head, then the whole body (turn the body off
    /// with [`Fingerprint::without_body`]). Each `update` is length-delimited, so two fields
    /// can never run into each other.
    pub fn custom(head: impl Fn(&Parts, &mut FingerprintHasher) + Send + Sync + 'static) -> Self {
        Self {
            head: Some(Arc::new(head)),
            body: true,
            enabled: true,
        }
    }

    /// Leaves the body out: the layer then does not wrap the body at all.
    pub fn without_body(mut self) -> Self {
        self.body = false;
        self
    }

    /// No fingerprint: a duplicate replays the original whatever its payload.
    pub fn disabled() -> Self {
        Self {
            head: None,
            body: false,
            enabled: false,
        }
    }

    /// Starts the fingerprint of a request: `None` when fingerprints are disabled.
    pub(crate) fn start(&self, parts: &Parts) -> Option<FingerprintHasher> {
        if !self.enabled {
            return None;
        }
        let mut hasher = FingerprintHasher::new();
        if let Some(head) = &self.head {
            head(parts, &mut hasher);
        }
        Some(hasher)
    }

    pub(crate) fn covers_body(&self) -> bool {
        self.enabled && self.body
    }
}

impl Default for Fingerprint {
    fn default() -> Self {
        Self::query_and_body()
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fingerprint")
            .field("enabled", &self.enabled)
            .field("head", &self.head.is_some())
            .field("body", &self.body)
            .finish()
    }
}

/// The xxh3-128 of what a [`Fingerprint`] feeds: its fields and the body, in order.
pub struct FingerprintHasher {
    state: State,
    body_started: bool,
}

/// Up to [`SHORT`] bytes are kept and hashed at the end in one call; past that, they move to
/// the streaming state. Both give the xxh3-128 of the same bytes. Most requests are short:
/// their hashing then costs one small allocation instead of the streaming state's large
/// aligned one and its set-up.
enum State {
    Short(Vec<u8>),
    // Boxed: the streaming state is large, and the hasher moves with the request.
    Long(Box<Xxh3>),
}

/// The length up to which xxh3's one-shot path is at its fastest (its short-input path).
const SHORT: usize = 240;

impl FingerprintHasher {
    fn new() -> Self {
        Self {
            state: State::Short(Vec::with_capacity(SHORT)),
            body_started: false,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        match &mut self.state {
            State::Short(kept) if kept.len() + bytes.len() <= SHORT => {
                kept.extend_from_slice(bytes)
            }
            State::Short(kept) => {
                let mut long = Box::new(Xxh3::new());
                long.update(kept);
                long.update(bytes);
                self.state = State::Long(long);
            }
            State::Long(long) => long.update(bytes),
        }
    }

    /// Feeds one length-delimited field of the request head.
    pub fn update(&mut self, field: &[u8]) {
        self.feed(&(field.len() as u64).to_le_bytes());
        self.feed(field);
    }

    /// Feeds body bytes (not length-delimited: chunk boundaries must not matter).
    pub(crate) fn update_body(&mut self, chunk: &[u8]) {
        if !self.body_started {
            // Separates the head fields from the body.
            self.feed(&u64::MAX.to_le_bytes());
            self.body_started = true;
        }
        self.feed(chunk);
    }

    pub(crate) fn finish(&self) -> u128 {
        match &self.state {
            State::Short(kept) => xxhash_rust::xxh3::xxh3_128(kept),
            State::Long(long) => long.digest128(),
        }
    }
}

impl fmt::Debug for FingerprintHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FingerprintHasher").finish_non_exhaustive()
    }
}

/// Reads `body` to its end, hashing every data chunk into `hasher`, and returns the digest.
pub(crate) async fn read_rest<B>(
    body: Pin<&mut B>,
    mut hasher: FingerprintHasher,
) -> Result<u128, BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    hash_rest(body, &mut hasher).await?;
    Ok(hasher.finish())
}

/// Reads `body` to its end, hashing every data chunk into `hasher` as it goes (so that a
/// caller dropped midway keeps what was hashed).
pub(crate) async fn hash_rest<B>(
    mut body: Pin<&mut B>,
    hasher: &mut FingerprintHasher,
) -> Result<(), BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        if let Some(data) = frame.map_err(Into::into)?.data_ref() {
            hasher.update_body(data.chunk());
        }
    }
    Ok(())
}

/// Why a duplicate's body has no fingerprint.
#[derive(Debug)]
pub(crate) enum HashError {
    /// Longer than the limit (declared or read).
    TooLarge,
    /// The body failed.
    Body(BoxError),
}

/// Hashes a whole body of at most `limit` bytes: the fingerprint of a duplicate. (An `async`
/// block, so that its arguments are not kept twice in every replay's state.)
#[allow(clippy::manual_async_fn)]
pub(crate) fn hash_body<B>(
    body: B,
    mut hasher: FingerprintHasher,
    limit: u64,
) -> impl std::future::Future<Output = Result<u128, HashError>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    async move {
        if body.size_hint().lower() > limit {
            return Err(HashError::TooLarge);
        }
        let mut body = std::pin::pin!(body);
        let mut read = 0u64;
        while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            let frame = frame.map_err(|e| HashError::Body(e.into()))?;
            if let Some(data) = frame.data_ref() {
                read += data.remaining() as u64;
                if read > limit {
                    return Err(HashError::TooLarge);
                }
                hasher.update_body(data.chunk());
            }
        }
        Ok(hasher.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::super::request_body::{take_slot, RequestBody, SlotState};
    use super::*;
    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::BodyExt;
    use proptest::prelude::*;
    use std::task::{Context, Poll};

    fn parts(uri: &str) -> Parts {
        http::Request::post(uri).body(()).unwrap().into_parts().0
    }

    /// A body delivered in chunks of the given sizes (cycled).
    struct Chunked(std::collections::VecDeque<Bytes>);

    impl Body for Chunked {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    fn chunked(data: &[u8], sizes: &[usize]) -> Chunked {
        let mut chunks = std::collections::VecDeque::new();
        let mut rest = data;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].clamp(1, rest.len());
            chunks.push_back(Bytes::copy_from_slice(&rest[..n]));
            rest = &rest[n..];
            i += 1;
        }
        Chunked(chunks)
    }

    fn fingerprint_of(fp: &Fingerprint, uri: &str, body: &[u8]) -> u128 {
        let mut hasher = fp.start(&parts(uri)).unwrap();
        hasher.update_body(body);
        hasher.finish()
    }

    #[tokio::test]
    async fn streamed_fingerprint_matches_whatever_the_chunking() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let fp = Fingerprint::default();
        let expected = fingerprint_of(&fp, "/p?a=1", &data);
        for sizes in [&[1usize][..], &[7, 4096], &[16 * 1024], &[100_000]] {
            let hasher = fp.start(&parts("/p?a=1")).unwrap();
            let (body, slot) = RequestBody::hashing(chunked(&data, sizes), hasher);
            let collected = body.collect().await.unwrap().to_bytes();
            assert_eq!(collected, data, "the handler sees the body unchanged");
            match take_slot(&slot) {
                SlotState::Done(digest) => assert_eq!(digest, expected, "chunks {sizes:?}"),
                _ => panic!("body read to the end must leave its digest"),
            }
        }
    }

    #[tokio::test]
    async fn a_body_dropped_early_leaves_the_rest_to_read() {
        let data = vec![9u8; 50_000];
        let fp = Fingerprint::default();
        let (mut body, slot) =
            RequestBody::hashing(chunked(&data, &[1000]), fp.start(&parts("/p")).unwrap());
        // The handler reads one frame and gives up.
        let _ = body.frame().await.unwrap().unwrap();
        drop(body);
        let SlotState::Leftover(mut rest, hasher) = take_slot(&slot) else {
            panic!("an unfinished body must be handed back");
        };
        assert_eq!(
            read_rest(rest.as_mut(), hasher).await.unwrap(),
            fingerprint_of(&fp, "/p", &data)
        );
    }

    #[test]
    fn query_and_body_both_count_and_cannot_run_into_each_other() {
        let fp = Fingerprint::default();
        let base = fingerprint_of(&fp, "/p?a=1", b"body");
        assert_ne!(base, fingerprint_of(&fp, "/p?a=2", b"body"));
        assert_ne!(base, fingerprint_of(&fp, "/p?a=1", b"bodz"));
        assert_ne!(
            fingerprint_of(&fp, "/p?ab", b"c"),
            fingerprint_of(&fp, "/p?a", b"bc")
        );
        assert_eq!(
            base,
            fingerprint_of(&fp, "/other/path?a=1", b"body"),
            "the path is part of the key, not the fingerprint"
        );
    }

    #[test]
    fn disabled_fingerprint_starts_nothing() {
        assert!(Fingerprint::disabled().start(&parts("/p")).is_none());
        assert!(!Fingerprint::disabled().covers_body());
        assert!(!Fingerprint::default().without_body().covers_body());
    }

    /// Fingerprints are stored with records: a release must compute the ones earlier releases
    /// stored, or every retry across an upgrade would get 422. Values from 0.1's streaming
    /// hasher, for a short request and one past any inline buffer.
    #[test]
    fn fingerprints_are_those_earlier_releases_stored() {
        let fp = Fingerprint::default();
        let long: Vec<u8> = (0..5000u32).map(|i| (i * 31) as u8).collect();
        let got = [
            fingerprint_of(&fp, "/p?a=1", b"{\"amount\":1000}"),
            fingerprint_of(&fp, "/p?a=1", &long),
            fingerprint_of(&fp, "/p", b""),
        ];
        assert_eq!(got, GOLDEN);
    }

    const GOLDEN: [u128; 3] = [
        0xa37614439843b24e97660ecdd1c0f016,
        0xde06b03bc6defbd5c8cedc0d07ecd4ab,
        0x91de7409ff967463439f3077b77bed63,
    ];

    proptest! {
        /// Whatever the sizes of the head fields and body chunks (short ones stay in a buffer,
        /// long ones stream), the fingerprint is the xxh3-128 of the same byte sequence.
        #[test]
        fn short_and_long_inputs_hash_the_same_bytes(
            fields in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..4),
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..4),
        ) {
            let mut hasher = FingerprintHasher::new();
            let mut bytes = Vec::new();
            for field in &fields {
                hasher.update(field);
                bytes.extend_from_slice(&(field.len() as u64).to_le_bytes());
                bytes.extend_from_slice(field);
            }
            for (i, chunk) in chunks.iter().enumerate() {
                hasher.update_body(chunk);
                if i == 0 {
                    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
                }
                bytes.extend_from_slice(chunk);
            }
            prop_assert_eq!(hasher.finish(), xxhash_rust::xxh3::xxh3_128(&bytes));
        }

        #[test]
        fn fingerprint_is_independent_of_chunk_boundaries(data in proptest::collection::vec(any::<u8>(), 0..4096), cut in 0usize..4096) {
            let fp = Fingerprint::body_only();
            let cut = cut.min(data.len());
            let mut split = fp.start(&parts("/")).unwrap();
            split.update_body(&data[..cut]);
            split.update_body(&data[cut..]);
            prop_assert_eq!(split.finish(), fingerprint_of(&fp, "/", &data));
        }
    }
}
