//! Entry points for the crate's benchmarks (hidden from the docs): not part of the
//! public API.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame};

use super::fingerprint::Fingerprint;
use super::request_body::{take_slot, RequestBody, SlotState};

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
