//! Request fingerprints: xxh3-128 over the query string and the whole body, hashed as it streams.
//!
//! A duplicate must carry the same request as the original, or it is refused with 422. The
//! layer compares a 128-bit \[xxh3\] fingerprint of the two requests. By default it covers the
//! query string and the **whole** body, never the headers (they differ between retries:
//! dates, tracing ids, auth tokens being refreshed).
//!
//! The body is never buffered: the handler receives a [`RequestBody`] that hashes each chunk
//! as it passes. Should the handler stop reading early, the layer drains and hashes the rest
//! after the handler answered, so the fingerprint always covers the whole body. A duplicate's
//! body is drained and hashed the same way before it is judged.
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
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Buf;
use http::request::Parts;
use http_body::{Body, Frame, SizeHint};
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

/// The streaming xxh3-128 state that a [`Fingerprint`] feeds.
pub struct FingerprintHasher {
    // Boxed: the state is about 600 bytes, and the hasher moves with the request.
    state: Box<Xxh3>,
    body_started: bool,
}

impl FingerprintHasher {
    fn new() -> Self {
        Self {
            state: Box::new(Xxh3::new()),
            body_started: false,
        }
    }

    /// Feeds one length-delimited field of the request head.
    pub fn update(&mut self, field: &[u8]) {
        self.state.update(&(field.len() as u64).to_le_bytes());
        self.state.update(field);
    }

    /// Feeds body bytes (not length-delimited: chunk boundaries must not matter).
    fn update_body(&mut self, chunk: &[u8]) {
        if !self.body_started {
            // Separates the head fields from the body.
            self.state.update(&u64::MAX.to_le_bytes());
            self.body_started = true;
        }
        self.state.update(chunk);
    }

    pub(crate) fn finish(&self) -> u128 {
        self.state.digest128()
    }
}

impl fmt::Debug for FingerprintHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FingerprintHasher").finish_non_exhaustive()
    }
}

pin_project_lite::pin_project! {
    /// The request body the inner service receives: the client's body, hashed as it streams
    /// when the request is guarded by a key. See the [module docs](self).
    pub struct RequestBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Plain { #[pin] body: B },
        Hashing { hashing: Hashing<B> },
    }
}

/// Where a hashing body leaves its result for the layer.
pub(crate) type Slot<B> = Arc<Mutex<SlotState<B>>>;

pub(crate) enum SlotState<B> {
    /// The body is still held by the handler.
    Reading,
    /// The body was read to its end: here is the fingerprint.
    Done(u128),
    /// The handler dropped the body before its end: the rest, to drain.
    Leftover(Pin<Box<B>>, FingerprintHasher),
    /// The body failed: no fingerprint can be made.
    Failed,
}

struct Hashing<B> {
    body: Option<Pin<Box<B>>>,
    hasher: Option<FingerprintHasher>,
    slot: Slot<B>,
}

impl<B> RequestBody<B> {
    /// A body passed through untouched.
    pub(crate) fn plain(body: B) -> Self {
        Self {
            kind: Kind::Plain { body },
        }
    }

    /// A body hashed into `hasher` as it streams; the outcome lands in the returned slot.
    pub(crate) fn hashing(body: B, hasher: FingerprintHasher) -> (Self, Slot<B>) {
        let slot = Arc::new(Mutex::new(SlotState::Reading));
        let hashing = Hashing {
            body: Some(Box::pin(body)),
            hasher: Some(hasher),
            slot: slot.clone(),
        };
        (
            Self {
                kind: Kind::Hashing { hashing },
            },
            slot,
        )
    }
}

fn set_slot<B>(slot: &Slot<B>, state: SlotState<B>) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = state;
}

pub(crate) fn take_slot<B>(slot: &Slot<B>) -> SlotState<B> {
    std::mem::replace(
        &mut *slot.lock().unwrap_or_else(|p| p.into_inner()),
        SlotState::Reading,
    )
}

impl<B> Drop for Hashing<B> {
    fn drop(&mut self) {
        if let (Some(body), Some(hasher)) = (self.body.take(), self.hasher.take()) {
            set_slot(&self.slot, SlotState::Leftover(body, hasher));
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Plain { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Hashing { hashing } => {
                let Some(body) = hashing.body.as_mut() else {
                    return Poll::Ready(None);
                };
                let frame = ready!(body.as_mut().poll_frame(cx));
                match &frame {
                    Some(Ok(frame)) => {
                        if let (Some(data), Some(hasher)) =
                            (frame.data_ref(), hashing.hasher.as_mut())
                        {
                            hasher.update_body(data.chunk());
                        }
                    }
                    Some(Err(_)) => {
                        hashing.body = None;
                        hashing.hasher = None;
                        set_slot(&hashing.slot, SlotState::Failed);
                    }
                    None => {
                        hashing.body = None;
                        if let Some(hasher) = hashing.hasher.take() {
                            set_slot(&hashing.slot, SlotState::Done(hasher.finish()));
                        }
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Plain { body } => body.is_end_stream(),
            // Reported as not ended so that the handler polls once more and the hasher sees
            // the end of the stream.
            Kind::Hashing { hashing } => hashing.body.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Plain { body } => body.size_hint(),
            Kind::Hashing { hashing } => hashing
                .body
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint()),
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hashing = matches!(self.kind, Kind::Hashing { .. });
        f.debug_struct("RequestBody")
            .field("hashing", &hashing)
            .finish()
    }
}

/// Reads `body` to its end, hashing every data chunk into `hasher`, and returns the digest.
pub(crate) async fn drain<B>(
    mut body: Pin<&mut B>,
    mut hasher: FingerprintHasher,
) -> Result<u128, BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        if let Some(data) = frame.map_err(Into::into)?.data_ref() {
            hasher.update_body(data.chunk());
        }
    }
    Ok(hasher.finish())
}

/// Hashes a whole body: the fingerprint of a duplicate.
pub(crate) async fn hash_body<B>(body: B, hasher: FingerprintHasher) -> Result<u128, BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    drain(std::pin::pin!(body), hasher).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use proptest::prelude::*;

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
    async fn a_body_dropped_early_leaves_the_rest_to_drain() {
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
            drain(rest.as_mut(), hasher).await.unwrap(),
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

    proptest! {
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

/// Entry points for the crate's benchmarks; not part of the public API.
#[doc(hidden)]
pub mod __bench {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use bytes::Bytes;
    use http_body::{Body, Frame};

    use super::{take_slot, Fingerprint, RequestBody, SlotState};

    /// A request body whose chunks are all ready, as a fast client's are.
    #[derive(Debug)]
    pub struct Chunks(VecDeque<Bytes>);

    impl Chunks {
        /// A body of these chunks.
        pub fn new(chunks: &[Bytes]) -> Self {
            Self(chunks.iter().cloned().collect())
        }
    }

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
        }
    }

    /// The head of a request, to start fingerprints with.
    pub fn parts() -> http::request::Parts {
        http::Request::post("/")
            .body(())
            .expect("valid")
            .into_parts()
            .0
    }

    /// Streams `body` through the hashing request body, as a handler reads it, and returns
    /// the fingerprint the layer would store.
    pub fn hash_streamed(parts: &http::request::Parts, body: Chunks) -> u128 {
        let hasher = Fingerprint::body_only().start(parts).expect("enabled");
        let (body, slot) = RequestBody::hashing(body, hasher);
        let mut body = std::pin::pin!(body);
        let mut cx = Context::from_waker(Waker::noop());
        while let Poll::Ready(Some(frame)) = body.as_mut().poll_frame(&mut cx) {
            std::hint::black_box(frame.expect("infallible"));
        }
        match take_slot(&slot) {
            SlotState::Done(digest) => digest,
            _ => unreachable!("the body was read to its end"),
        }
    }
}
