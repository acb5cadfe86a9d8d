//! [`RequestBody`]: the body the inner service receives, hashed as it streams when the
//! request is guarded by a key (see [`fingerprint`](crate::fingerprint)).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};

use super::fingerprint::FingerprintHasher;
use crate::protocol::{BodyFingerprint, ClaimGuard, RequestFingerprint};
use crate::store::Store;
use crate::BoxError;

pin_project_lite::pin_project! {
    /// The request body the inner service receives: the client's body, hashed as it streams
    /// when the request is guarded by a key. See the [`fingerprint`](crate::fingerprint) module.
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
    /// The handler dropped the body before its end: the rest, to read out.
    Leftover(Pin<Box<B>>, FingerprintHasher),
    /// The body failed: no fingerprint can be made.
    Failed,
    /// The handler dropped the body before its end, and a recovery point's call is reading
    /// out the rest: wait for it.
    ReadingOut,
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

/// Where the original's fingerprint will come from once its handler has answered.
pub(crate) enum PendingFingerprint<B> {
    /// Hashed as the handler reads the body.
    Streaming(Slot<B>),
    /// Known already (head only), or not taken.
    Known(Option<u128>),
}

/// The body the handler gets for a guarded request, and how to learn its fingerprint.
pub(crate) fn attach<B>(
    body: B,
    hasher: Option<FingerprintHasher>,
    covers_body: bool,
) -> (RequestBody<B>, PendingFingerprint<B>) {
    match hasher {
        Some(hasher) if covers_body => {
            let (body, slot) = RequestBody::hashing(body, hasher);
            (body, PendingFingerprint::Streaming(slot))
        }
        Some(hasher) => (
            RequestBody::plain(body),
            PendingFingerprint::Known(Some(hasher.finish())),
        ),
        None => (RequestBody::plain(body), PendingFingerprint::Known(None)),
    }
}

impl<B> PendingFingerprint<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Where the run's recovery points learn the request's fingerprint (they are bound to it).
    pub(crate) fn for_points(&self) -> RequestFingerprint {
        match self {
            PendingFingerprint::Known(known) => RequestFingerprint::Known(*known),
            PendingFingerprint::Streaming(slot) => RequestFingerprint::Body(slot.clone()),
        }
    }
}

/// A recovery point asks for the fingerprint while the handler runs: known once the body was
/// read to its end; a body the handler dropped unread is read out (and hashed) now, and left
/// in the slot as done for the layer.
impl<B> BodyFingerprint for Mutex<SlotState<B>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn finished(&self) -> Pin<Box<dyn Future<Output = Option<u128>> + Send + '_>> {
        Box::pin(async move {
            let leftover = loop {
                {
                    let mut state = self.lock().unwrap_or_else(|p| p.into_inner());
                    match &*state {
                        SlotState::Done(digest) => return Some(*digest),
                        SlotState::Reading | SlotState::Failed => return None,
                        SlotState::Leftover(..) => {
                            break std::mem::replace(&mut *state, SlotState::ReadingOut)
                        }
                        SlotState::ReadingOut => {}
                    }
                }
                // Another call reads the rest out: its result lands in the slot (or, should it
                // be dropped, the rest goes back for this call to read).
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            };
            let SlotState::Leftover(rest, hasher) = leftover else {
                unreachable!("only a leftover body is taken out")
            };
            // Only this call holds the body now (the handler dropped it). Should this call be
            // dropped before the end, what is left (with the hash of what was read) goes back.
            let mut reading = ReadingOut {
                slot: self,
                rest: Some((rest, hasher)),
            };
            let fingerprint = reading.read().await;
            *self.lock().unwrap_or_else(|p| p.into_inner()) = match fingerprint {
                Some(digest) => SlotState::Done(digest),
                None => SlotState::Failed,
            };
            fingerprint
        })
    }
}

/// A leftover body being read out for a recovery point; put back if dropped before its end.
struct ReadingOut<'a, B> {
    slot: &'a Mutex<SlotState<B>>,
    rest: Option<(Pin<Box<B>>, FingerprintHasher)>,
}

impl<B> ReadingOut<'_, B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    /// Reads the rest and hashes it: the fingerprint, or `None` when the body failed.
    async fn read(&mut self) -> Option<u128> {
        let (body, hasher) = self.rest.as_mut()?;
        if super::fingerprint::hash_rest(body.as_mut(), hasher)
            .await
            .is_err()
        {
            self.rest = None;
            return None;
        }
        self.rest.take().map(|(_, hasher)| hasher.finish())
    }
}

impl<B> Drop for ReadingOut<'_, B> {
    fn drop(&mut self) {
        if let Some((rest, hasher)) = self.rest.take() {
            *self.slot.lock().unwrap_or_else(|p| p.into_inner()) =
                SlotState::Leftover(rest, hasher);
        }
    }
}

impl<B> PendingFingerprint<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    /// The fingerprint, once the handler answered. A body the handler left unread is read out
    /// and hashed now, still under the claim (a slow client may take a while); `None` when the
    /// body failed or the handler kept it past its answer.
    /// Once finished, the fingerprint is known: a second call answers the same at once.
    pub(crate) async fn finish<St: Store>(&mut self, guard: &ClaimGuard<St>) -> Option<u128> {
        let finished = self.finish_once(guard).await;
        *self = PendingFingerprint::Known(finished);
        finished
    }

    async fn finish_once<St: Store>(&mut self, guard: &ClaimGuard<St>) -> Option<u128> {
        match std::mem::replace(self, PendingFingerprint::Known(None)) {
            PendingFingerprint::Known(known) => known,
            PendingFingerprint::Streaming(slot) => {
                let fingerprint = match take_slot(&slot) {
                    SlotState::Done(digest) => Some(digest),
                    SlotState::Leftover(mut rest, hasher) => guard
                        .keep_alive(super::fingerprint::read_rest(rest.as_mut(), hasher))
                        .await
                        .ok(),
                    SlotState::Failed | SlotState::Reading | SlotState::ReadingOut => None,
                };
                if fingerprint.is_none() {
                    tracing::warn!(
                        "request body could not be fingerprinted; duplicates will not be compared"
                    );
                }
                fingerprint
            }
        }
    }
}
