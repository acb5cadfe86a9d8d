//! The response body the layer returns: the inner body, a buffered original, or a replay.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::live::LiveBody;
use crate::BoxError;

pin_project_lite::pin_project! {
    /// The body of every response that passes through [`Idempotency`](crate::Idempotency):
    /// the handler's own body, or a stored one being replayed.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Prefixed { prefix: VecDeque<Frame<Bytes>>, rest: Pin<Box<B>> },
        Full { data: Option<Bytes>, trailers: Option<http::HeaderMap> },
        Chunks { chunks: Arc<[Bytes]>, next: usize, trailers: Option<http::HeaderMap> },
        // Boxed: only a streamed original or a joined duplicate has one.
        Live { body: Box<LiveBody> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// Frames already read from `rest`, then the rest of it.
    pub(crate) fn prefixed(prefix: VecDeque<Frame<Bytes>>, rest: Pin<Box<B>>) -> Self {
        Self {
            kind: Kind::Prefixed { prefix, rest },
        }
    }

    /// A reader of a live stream (see [`live`](super::live)).
    pub(crate) fn live(body: LiveBody) -> Self {
        Self {
            kind: Kind::Live {
                body: Box::new(body),
            },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self::full_with_trailers(data, None)
    }

    /// A body of `chunks` (shared, answered one frame each, as they were produced), then
    /// `trailers`.
    pub(crate) fn chunks(chunks: Arc<[Bytes]>, trailers: Option<http::HeaderMap>) -> Self {
        Self {
            kind: Kind::Chunks {
                chunks,
                next: 0,
                trailers,
            },
        }
    }

    pub(crate) fn full_with_trailers(data: Bytes, trailers: Option<http::HeaderMap>) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }
}

impl<B> ResponseBody<B> {
    /// Whether the body is whole in memory ([`full`](Self::full), [`chunks`](Self::chunks)),
    /// so that [`into_full`](Self::into_full) gives all of it.
    pub(crate) fn is_in_memory(&self) -> bool {
        matches!(self.kind, Kind::Full { .. } | Kind::Chunks { .. })
    }

    /// The data (what is left of it, as one buffer: a copy when it is several chunks) and
    /// trailers of a body whole in memory ([`is_in_memory`](Self::is_in_memory)); nothing for
    /// another body.
    pub(crate) fn into_full(self) -> (Option<Bytes>, Option<http::HeaderMap>) {
        match self.kind {
            Kind::Full { data, trailers } => (data, trailers),
            Kind::Chunks {
                chunks,
                next,
                trailers,
            } => {
                let data = match &chunks[next.min(chunks.len())..] {
                    [] => None,
                    [one] => Some(one.clone()),
                    many => Some(Bytes::from(many.concat())),
                };
                (data, trailers)
            }
            _ => (None, None),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            KindProj::Prefixed { prefix, rest } => match prefix.pop_front() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => rest.as_mut().poll_frame(cx).map_err(Into::into),
            },
            KindProj::Full { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            KindProj::Chunks {
                chunks,
                next,
                trailers,
            } => Poll::Ready(
                match chunks.get(*next) {
                    Some(chunk) => {
                        *next += 1;
                        Some(Frame::data(chunk.clone()))
                    }
                    None => trailers.take().map(Frame::trailers),
                }
                .map(Ok),
            ),
            KindProj::Live { body } => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Prefixed { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Chunks {
                chunks,
                next,
                trailers,
            } => *next >= chunks.len() && trailers.is_none(),
            Kind::Live { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Prefixed { prefix, rest } => {
                let buffered: u64 = prefix
                    .iter()
                    .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                    .sum();
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(buffered + rest.lower());
                if let Some(upper) = rest.upper() {
                    hint.set_upper(buffered + upper);
                }
                hint
            }
            Kind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Chunks { chunks, next, .. } => SizeHint::with_exact(
                chunks
                    .get(*next..)
                    .unwrap_or_default()
                    .iter()
                    .map(|c| c.len() as u64)
                    .sum(),
            ),
            Kind::Live { .. } => SizeHint::new(),
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Inner { .. } => "inner",
            Kind::Prefixed { .. } => "prefixed",
            Kind::Full { .. } => "full",
            Kind::Chunks { .. } => "chunks",
            Kind::Live { .. } => "live",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}
