//! Capturing the original's answer: which answers are stored, reading a storable body up to
//! the limit, and turning it into a record.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL};
use http::request::Parts;
use http::{HeaderName, Response};
use http_body::{Body, Frame};

use super::config::StatusFn;
use super::record;
use super::response_body::ResponseBody;
use crate::protocol::ReleaseReason;
use crate::store::Record;
use crate::BoxError;

/// Marks a response that must not be stored: put it in the response's extensions. The key is
/// released, as for `Cache-Control: no-store`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoStore;

/// What the handler produced, read up to the storage limit.
pub(crate) enum Produced<B> {
    /// Not to be stored: released and returned as it is (with what was read of it).
    Unstored(Response<ResponseBody<B>>, ReleaseReason),
    /// Storable: the head, the frames read, the rest of the body, and whether the frames are
    /// the whole body (else it was larger than the limit).
    Storable(Captured<B>),
    /// The body failed while being read.
    Failed(BoxError),
    /// Storable, and its body is not whole yet (a poll returned `Pending` before its end, and
    /// streaming was asked for): the head and the frames read so far, to stream from
    /// [`live::start`](super::live::start).
    Streaming(Captured<B>),
}

/// A storable answer, read up to the limit.
pub(crate) struct Captured<B> {
    pub(crate) head: http::response::Parts,
    pub(crate) frames: VecDeque<Frame<Bytes>>,
    pub(crate) rest: Pin<Box<B>>,
    pub(crate) whole: bool,
}

/// How many frames of a body that has not ended [`read`] holds before it streams it (when
/// streaming is asked for) even though every frame was ready: a JSON answer (one frame, a
/// few) never gets there; a fast producer's stream does not wait for its end.
const STREAM_AFTER_FRAMES: usize = 16;

/// Request headers of the original that replays carry (`x-request-id` by default).
pub(crate) fn carried_headers(
    parts: &Parts,
    carried: &[(HeaderName, HeaderName)],
) -> Vec<(HeaderName, HeaderValue)> {
    carried
        .iter()
        .filter_map(|(name, _)| parts.headers.get(name).map(|v| (name.clone(), v.clone())))
        .collect()
}

/// Which answers [`read`] stores.
pub(crate) enum Keep<'a> {
    /// The storable ones: of a plain HTTP answer, the statuses this function accepts and no
    /// `no-store`; of a gRPC call, a success.
    Storable(&'a StatusFn),
    /// Any answer that can be replayed whole or by its head (a run whose recovery point was not
    /// saved: its key must not be released).
    Any,
}

/// Reads a storable response's body up to `max_body` bytes; anything else is returned
/// untouched. `keep` says which answers are stored. With `stream`, a body that is not whole
/// at once (a poll returns `Pending` before its end, or [`STREAM_AFTER_FRAMES`] frames came
/// before it) is handed back as
/// [`Produced::Streaming`], to be answered while it is stored; a body whole at once is read as
/// without it.
///
/// A gRPC call (`grpc`) is storable only when it succeeded: HTTP 200 and `grpc-status: 0` (in
/// its trailers, or in the headers of a trailers-only answer), which is known only once the
/// body is read. So an answer past `max_body` is read to its end too (a keyed gRPC call is
/// unary: its one message is whole in the handler's memory already), and a success is
/// storable by its head only: the record a duplicate gets `FAILED_PRECONDITION` from (a
/// replay without its message is no gRPC answer), so that the call is never run twice.
pub(crate) async fn read<B>(
    response: Response<B>,
    keep: Keep<'_>,
    max_body: usize,
    grpc: bool,
    stream: bool,
) -> Produced<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let keep_any = matches!(keep, Keep::Any);
    let storable_status = match keep {
        Keep::Any => true,
        Keep::Storable(_) if grpc => response.status() == http::StatusCode::OK,
        Keep::Storable(store_status) => store_status(response.status()),
    };
    if !storable_status {
        return Produced::Unstored(response.map(ResponseBody::inner), ReleaseReason::Status);
    }
    if !keep_any
        && (response.extensions().get::<NoStore>().is_some() || has_no_store(response.headers()))
    {
        return Produced::Unstored(response.map(ResponseBody::inner), ReleaseReason::NoStore);
    }
    let (head, body) = response.into_parts();
    let limit = max_body as u64;
    let mut frames = VecDeque::new();
    let mut rest = Box::pin(body);
    let mut whole = rest.size_hint().lower() <= limit;
    let mut read = 0u64;
    while whole {
        let polled = std::future::poll_fn(|cx| match rest.as_mut().poll_frame(cx) {
            Poll::Pending if stream => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
        })
        .await;
        let Some(polled) = polled else {
            return Produced::Streaming(Captured {
                head,
                frames,
                rest,
                whole: false,
            });
        };
        match polled {
            None => break,
            Some(Err(error)) => return Produced::Failed(error.into()),
            Some(Ok(frame)) => {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                frames.push_back(frame);
                whole = read <= limit;
                if stream && whole && frames.len() >= STREAM_AFTER_FRAMES {
                    // A body of many frames, each ready when asked (a producer as fast as
                    // its reader): a stream all the same, whose first bytes go out now
                    // rather than once it is whole.
                    return Produced::Streaming(Captured {
                        head,
                        frames,
                        rest,
                        whole: false,
                    });
                }
            }
        }
    }
    if grpc {
        if !whole {
            // Past the bound: read on to the trailers, which say whether the call succeeded.
            loop {
                let frame = std::future::poll_fn(|cx| rest.as_mut().poll_frame(cx)).await;
                match frame {
                    None => break,
                    Some(Ok(frame)) => frames.push_back(frame),
                    Some(Err(error)) => return Produced::Failed(error.into()),
                }
            }
        }
        let succeeded = grpc_status(&head.headers, &frames) == Some(b"0".as_slice());
        // Kept whatever its status (`keep_any`) only whole: a failure past the bound cannot
        // be replayed, so after an unsaved point it is kept as `#progress-unsaved` instead.
        let failed = if !succeeded && (!keep_any || !whole) {
            Some(ReleaseReason::Status)
        } else {
            None
        };
        if let Some(reason) = failed {
            let body = ResponseBody::prefixed(frames, rest);
            return Produced::Unstored(Response::from_parts(head, body), reason);
        }
    }
    if !whole {
        tracing::info!(
            outcome = "body_omitted",
            limit = max_body,
            "response body too large to store; storing status and headers only"
        );
    }
    Produced::Storable(Captured {
        head,
        frames,
        rest,
        whole,
    })
}

impl<B> Captured<B> {
    /// The record of this answer: status, stored headers, carried request headers, and the
    /// body when it was read whole.
    ///
    /// The record shares the body's chunks (a store in this process keeps them as they are),
    /// so each is first made to hold no more memory than it shows, give or take its spare
    /// capacity (see [`held_alone`]): what a memory store charges is then what it keeps alive.
    pub(crate) fn record(
        &mut self,
        fingerprint: Option<u128>,
        carried: &[(HeaderName, HeaderValue)],
        keep: impl Fn(&HeaderName) -> bool,
    ) -> Record {
        let held: usize = if self.whole {
            self.frames
                .iter_mut()
                .filter_map(Frame::data_mut)
                .map(held_alone)
                .sum()
        } else {
            0
        };
        let body = self
            .whole
            .then(|| self.frames.iter().filter_map(Frame::data_ref));
        let trailers = self.frames.iter().find_map(Frame::trailers_ref);
        record::record(
            fingerprint,
            self.head.status,
            &self.head.headers,
            keep,
            carried,
            body,
            trailers.filter(|_| self.whole),
        )
        .holding_body(held)
    }
}

/// Makes `data` a chunk a record may share without keeping more alive than it charges, and
/// answers the bytes it keeps allocated. A chunk the response holds alone (a body built for
/// this request: a `Vec`, a `String`, a `BytesMut`) is kept, charged its capacity, unless that
/// is over twice its length (then it is copied to its length). A chunk shared with anything
/// else (a slice of a larger buffer, a cached or static body) may keep any amount alive
/// unseen: it is copied, once (the response then sends the copy).
///
/// What it keeps is charged as the allocator and `bytes` lay it out: the buffer rounded as
/// glibc's `malloc` rounds it, and the shared header (32 bytes) a chunk gets once the record
/// and the response both hold it; so a response of many tiny chunks is charged what they take,
/// not their few bytes.
pub(crate) fn held_alone(data: &mut Bytes) -> usize {
    /// `bytes`' shared header (a pointer, a capacity, a count), as `malloc` rounds it.
    const SHARED_HEADER: usize = 32;
    if data.is_empty() {
        return 0;
    }
    let buffer = keep_alone(data);
    record::allocation(buffer) + SHARED_HEADER
}

/// [`held_alone`]'s choice: keeps `data` or copies it, and answers the bytes of its buffer.
fn keep_alone(data: &mut Bytes) -> usize {
    let len = data.len();
    match std::mem::take(data).try_into_mut() {
        Ok(alone) if alone.capacity() <= 2 * len + 64 => {
            let held = alone.capacity();
            *data = alone.freeze();
            held
        }
        Ok(spare) => {
            *data = Bytes::copy_from_slice(&spare);
            len
        }
        Err(shared) => {
            *data = Bytes::copy_from_slice(&shared);
            len
        }
    }
}

/// A gRPC answer's status: from its trailers, or from its headers when it has none.
fn grpc_status<'a>(
    headers: &'a http::HeaderMap,
    frames: &'a VecDeque<Frame<Bytes>>,
) -> Option<&'a [u8]> {
    let trailers = frames.iter().find_map(Frame::trailers_ref);
    trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .map(|v| v.as_bytes())
}

fn has_no_store(headers: &http::HeaderMap) -> bool {
    headers.get_all(CACHE_CONTROL).iter().any(|value| {
        value
            .to_str()
            .map(|v| {
                v.split(',')
                    .any(|d| d.trim().eq_ignore_ascii_case("no-store"))
            })
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body built for the response, its capacity close to its length, is kept as it is and
    /// charged that capacity.
    #[test]
    fn a_chunk_the_response_holds_alone_is_kept_and_charged_its_capacity() {
        let mut data = Bytes::from(vec![1u8; 1000]);
        let at = data.as_ptr();
        assert_eq!(
            held_alone(&mut data),
            1008 + 32,
            "malloc's rounding and the header"
        );
        assert_eq!(data.as_ptr(), at);
        let mut grown = Vec::with_capacity(1500);
        grown.extend_from_slice(&[2u8; 1000]);
        let mut data = Bytes::from(grown);
        assert_eq!(held_alone(&mut data), 1520 + 32);
    }

    /// Spare capacity over twice the length, or a chunk shared with anything else, is copied
    /// to its length: what is charged is what stays allocated.
    #[test]
    fn a_chunk_with_much_spare_room_or_shared_is_copied_to_its_length() {
        let mut roomy = Vec::with_capacity(1 << 20);
        roomy.extend_from_slice(b"small");
        let mut data = Bytes::from(roomy);
        assert_eq!(held_alone(&mut data), 32 + 32);
        assert_eq!(data.try_into_mut().unwrap().capacity(), 5);
        let big = Bytes::from(vec![3u8; 4096]);
        let mut slice = big.slice(..10);
        assert_eq!(held_alone(&mut slice), 32 + 32);
        assert_eq!(slice, big.slice(..10));
        assert_ne!(slice.as_ptr(), big.as_ptr());
        let mut fixed = Bytes::from_static(b"static");
        assert_eq!(
            held_alone(&mut fixed),
            32 + 32,
            "a tiny chunk costs what malloc gives it"
        );
        assert_eq!(held_alone(&mut Bytes::new()), 0);
        assert_eq!(fixed, "static");
    }
}
