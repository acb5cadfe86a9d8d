//! A keyed answer that streams while it is stored: [`Live`], the state one original's stream
//! shares with its readers (the original client, and duplicates that join it), and the pump
//! task that reads the handler's body into it.
//!
//! The layer switches to it only when a storable body is not whole at once: a poll of the
//! handler's body returned `Pending` before its end ([`capture::read`](super::capture)). The
//! head is answered then, and the pump (holding the claim, its lease renewal and its drain
//! ticket) reads the rest: each chunk is kept (up to `max_stored_body`) and handed to every
//! reader as it comes. At the end the record is built from the kept chunks and stored, and
//! only then do the readers see the end. Should the body fail, nothing is stored, the key is
//! released, and every reader's body fails (never a clean end).
//!
//! Past `max_stored_body`, the record keeps status and headers only; the chunks after the bound
//! go to the original client alone, through a small bounded channel (the pump waits for it, so
//! memory stays bounded), or are drained unread once it is gone. A joined duplicate that reaches
//! the bound fails.
//!
//! Across instances: the pump's appender task ([`Appending`]) appends the stream to the store
//! (chunk 0 the sealed head, then the kept chunks in batches), and a duplicate on another
//! instance that finds the key in flight and no stream here reads it ([`find`]): a follower
//! task polls the store into a [`Live`] of its own instance, which its joiners read as they
//! read a local one (`docs/streaming.md`, "Joining across instances").

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame};
use tokio::sync::{mpsc, Notify};
use tracing::Instrument;

use super::capture::{self, Captured};
use super::record;
use super::replay::REPLAYED_HEADER;
use super::response_body::ResponseBody;
use super::sse;
use crate::protocol::{self, ClaimGuard, Failure, Outcome, OutcomeHook, ReleaseReason, Timings};
use crate::store::seal::{self, Unreadable};
use crate::store::{OwnerToken, Record, Store, StoreError, StreamRead};
use crate::BoxError;
use crate::RecoveryPoints;

/// How many frames past the stored bound may wait for the original client.
const TAIL_FRAMES: usize = 4;

/// The streams of one service that are live now, by store key: a duplicate that joins looks
/// its original up here.
#[derive(Default)]
pub(crate) struct Registry {
    streams: Mutex<HashMap<Arc<str>, Arc<Live>>>,
    /// The store answered `Unsupported` to a live stream's append or read: no stream of this
    /// service appends to it, and no duplicate reads it, again.
    unsupported: AtomicBool,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Live>>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live stream of `key`, if one streams in this service now.
    pub(crate) fn get(&self, key: &str) -> Option<Arc<Live>> {
        self.lock().get(key).cloned()
    }

    /// Whether the store keeps live streams (until it first answered it does not).
    pub(crate) fn store_streams(&self) -> bool {
        !self.unsupported.load(Ordering::Relaxed)
    }

    fn insert(&self, key: Arc<str>, live: Arc<Live>) {
        self.lock().insert(key, live);
    }

    /// Removes `key`'s entry if it is still `live` (a later stream of the key keeps its own).
    fn remove(&self, key: &str, live: &Arc<Live>) {
        let mut streams = self.lock();
        if streams.get(key).is_some_and(|now| Arc::ptr_eq(now, live)) {
            streams.remove(key);
        }
    }
}

/// One original's stream, shared by its pump and its readers.
pub(crate) struct Live {
    status: StatusCode,
    /// What a joined duplicate gets: the stored headers, marked as a replay.
    headers: HeaderMap,
    /// The original's request fingerprint, to compare a joining duplicate's with.
    fingerprint: Option<u128>,
    event_stream: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The chunks so far, up to the stored bound.
    chunks: Vec<Bytes>,
    /// Past the bound: no more chunks are kept (the rest goes to the original client alone).
    overflowed: bool,
    end: Option<End>,
    wakers: Vec<Waker>,
}

enum End {
    /// The record is stored (or storing it was tried); the trailers, if any were kept.
    Done(Option<HeaderMap>),
    /// The body failed (or the pump panicked): nothing was stored.
    Failed,
}

impl Live {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the state and wakes every reader.
    fn update(&self, change: impl FnOnce(&mut State)) {
        let wakers = {
            let mut state = self.lock();
            change(&mut state);
            std::mem::take(&mut state.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// The original request's fingerprint.
    pub(crate) fn fingerprint(&self) -> Option<u128> {
        self.fingerprint
    }
}

/// A reader of a [`Live`] stream: its chunks from the first, then each as it comes.
pub(crate) struct LiveBody {
    live: Arc<Live>,
    next: usize,
    /// The original client's: the frames past the stored bound.
    tail: Option<mpsc::Receiver<Frame<Bytes>>>,
    /// A joiner's `Last-Event-ID`: events are held until the one it names has passed.
    resume: Option<Resume>,
    /// A frame to answer before reading on (the trailers after a resume's held data).
    pending: Option<Frame<Bytes>>,
    finished: bool,
}

/// A joiner waiting for the event its `Last-Event-ID` names.
struct Resume {
    id: HeaderValue,
    held: BytesMut,
}

fn joined_failed() -> BoxError {
    "the original's stream failed before its end; nothing was stored".into()
}

impl LiveBody {
    fn new(live: Arc<Live>) -> Self {
        Self {
            live,
            next: 0,
            tail: None,
            resume: None,
            pending: None,
            finished: false,
        }
    }

    /// The next frame as the stream gives it, without `Last-Event-ID`.
    fn poll_raw(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        // Past the kept chunks: the end, or (past the bound) the original's own tail.
        {
            let mut state = self.live.lock();
            if let Some(chunk) = state.chunks.get(self.next) {
                self.next += 1;
                return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
            }
            if !state.overflowed {
                match &state.end {
                    Some(End::Done(trailers)) => {
                        self.finished = true;
                        return Poll::Ready(trailers.clone().map(|t| Ok(Frame::trailers(t))));
                    }
                    Some(End::Failed) => {
                        self.finished = true;
                        return Poll::Ready(Some(Err(joined_failed())));
                    }
                    None => {
                        if !state.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                            state.wakers.push(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                }
            }
        }
        let Some(tail) = self.tail.as_mut() else {
            self.finished = true;
            tracing::info!(
                outcome = "join_past_bound",
                "a joined stream went past max_stored_body; ending the duplicate with an error"
            );
            return Poll::Ready(Some(Err(
                "the joined stream went past the stored bound".into()
            )));
        };
        match tail.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) => {
                self.finished = true;
                match self.live.lock().end {
                    Some(End::Done(_)) => Poll::Ready(None),
                    _ => Poll::Ready(Some(Err(joined_failed()))),
                }
            }
        }
    }

    /// The next frame for this reader: as [`poll_raw`](Self::poll_raw), after the event a
    /// joiner's `Last-Event-ID` names (held until it passes; all of it if it never does).
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.pending.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        loop {
            let frame = std::task::ready!(self.poll_raw(cx));
            let Some(resume) = self.resume.as_mut() else {
                return Poll::Ready(frame);
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        resume.held.extend_from_slice(&data);
                        if let Some(at) = sse::resume_at(&resume.held, resume.id.as_bytes()) {
                            let tail = std::mem::take(&mut resume.held).freeze().slice(at..);
                            self.resume = None;
                            if !tail.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(tail))));
                            }
                        }
                    }
                    // Trailers end the data: the id was never found, so all of it is sent.
                    Err(trailers) => {
                        let held = self.resume.take().map(|r| r.held.freeze());
                        match held.filter(|h| !h.is_empty()) {
                            None => return Poll::Ready(Some(Ok(trailers))),
                            Some(held) => {
                                self.pending = Some(trailers);
                                return Poll::Ready(Some(Ok(Frame::data(held))));
                            }
                        }
                    }
                },
                // The end without the id: the whole stream (the record's rule).
                None => {
                    let held = self.resume.take().map(|r| r.held.freeze());
                    return Poll::Ready(held.filter(|h| !h.is_empty()).map(|h| Ok(Frame::data(h))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
            }
        }
    }
}

impl Body for LiveBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.poll_next(cx)
    }
}

/// What the pump needs to store the record at the end.
pub(crate) struct Storing {
    pub(crate) fingerprint: Option<u128>,
    /// The run's recovery points: should one have failed to save, a body that fails stores
    /// `unsaved` (500 `#progress-unsaved`) instead of releasing the key.
    pub(crate) points: RecoveryPoints,
    pub(crate) unsaved: Record,
    pub(crate) carried: Vec<(HeaderName, HeaderValue)>,
    pub(crate) config: Arc<super::config::Config>,
    pub(crate) ttl: Duration,
    pub(crate) registry: Arc<Registry>,
    pub(crate) hook: OutcomeHook,
}

/// Answers the head of `captured` now and streams its body from a pump task that stores it
/// under `guard` (see the module docs). The original client's response.
pub(crate) fn start<St, B>(
    guard: ClaimGuard<St>,
    captured: Captured<B>,
    storing: Storing,
) -> Response<ResponseBody<B>>
where
    St: Store + Clone,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let Captured {
        head, frames, rest, ..
    } = captured;
    let config = &storing.config;
    let mut headers = HeaderMap::with_capacity(head.headers.len() + 1);
    for (name, value) in head.headers.iter() {
        if config.stores_header(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    let mut bytes = 0;
    let chunks = frames
        .into_iter()
        .filter_map(|frame| frame.into_data().ok())
        .inspect(|data| bytes += data.len())
        .collect();
    let live = Arc::new(Live {
        status: head.status,
        event_stream: sse::is_event_stream(&head.headers),
        headers,
        fingerprint: storing.fingerprint,
        state: Mutex::new(State {
            chunks,
            ..State::default()
        }),
    });
    let key: Arc<str> = guard.key().into();
    storing.registry.insert(key.clone(), live.clone());
    let (tx, rx) = mpsc::channel(TAIL_FRAMES);
    tracing::debug!(
        outcome = "streaming",
        "the body is not whole yet; answering the head and storing the stream as it goes"
    );
    // Duplicates on other instances follow the stream in the store (not on the fast path: a
    // body whole at once never gets here).
    let appending = Appending::start(&guard, &live, storing.ttl, &storing.registry);
    let pump = pump(
        guard,
        live.clone(),
        rest,
        tx,
        (bytes, appending),
        key,
        storing,
        head.headers.clone(),
    );
    tokio::spawn(pump.instrument(tracing::Span::current()));
    let mut body = LiveBody::new(live);
    body.tail = Some(rx);
    Response::from_parts(head, ResponseBody::live(body))
}

/// A duplicate joining `live`: the original's status and headers (marked as a replay), every
/// chunk so far, then each as it comes; after `last_event_id` only, when it is an event stream.
pub(crate) fn join<B>(
    live: Arc<Live>,
    last_event_id: Option<Box<HeaderValue>>,
) -> Response<ResponseBody<B>> {
    tracing::debug!(outcome = "joined", "joining the original's live stream");
    let mut response = Response::new(());
    *response.status_mut() = live.status;
    *response.headers_mut() = live.headers.clone();
    if live.event_stream && last_event_id.is_some() {
        response.headers_mut().remove(http::header::CONTENT_LENGTH);
    }
    let resume = last_event_id
        .filter(|id| live.event_stream && !id.is_empty())
        .map(|id| Resume {
            id: *id,
            held: BytesMut::new(),
        });
    let mut body = LiveBody::new(live);
    body.resume = resume;
    response.map(|()| ResponseBody::live(body))
}

/// Reads the rest of the original's body into `live`, then stores the record or releases the
/// key, then ends the readers.
#[allow(clippy::too_many_arguments)]
async fn pump<St, B>(
    guard: ClaimGuard<St>,
    live: Arc<Live>,
    mut rest: Pin<Box<B>>,
    tx: mpsc::Sender<Frame<Bytes>>,
    (mut bytes, appending): (usize, Option<Appending>),
    key: Arc<str>,
    storing: Storing,
    head: HeaderMap,
) where
    St: Store + Clone,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let limit = storing.config.max_stored_body;
    // Should this task end without ending the stream (a panic in the layer's own code, a
    // runtime shutting down), its readers fail instead of waiting for ever.
    let _ending = Ending {
        live: live.clone(),
        registry: storing.registry.clone(),
        key: key.clone(),
    };
    let read = guard
        .run(async {
            let mut tx = Some(tx);
            let mut trailers = None;
            // Kept since the appender was last woken.
            let mut unsent = 0;
            loop {
                let frame = match std::future::poll_fn(|cx| rest.as_mut().poll_frame(cx)).await {
                    None => return Ok((trailers, tx)),
                    Some(Err(error)) => return Err::<_, BoxError>(error.into()),
                    Some(Ok(frame)) => frame,
                };
                let overflowed = live.lock().overflowed;
                let frame = if overflowed {
                    frame
                } else {
                    match frame.into_data() {
                        Ok(data) if bytes + data.len() <= limit => {
                            bytes += data.len();
                            unsent += data.len();
                            live.update(|state| state.chunks.push(data));
                            if unsent >= APPEND_BYTES {
                                unsent = 0;
                                if let Some(appending) = &appending {
                                    appending.wake.notify_one();
                                }
                            }
                            continue;
                        }
                        Ok(data) => {
                            tracing::info!(
                                outcome = "body_omitted",
                                limit,
                                "streamed body too large to store; storing status and headers only"
                            );
                            live.update(|state| state.overflowed = true);
                            Frame::data(data)
                        }
                        Err(frame) => match frame.into_trailers() {
                            Ok(t) => {
                                trailers = Some(t);
                                continue;
                            }
                            Err(frame) => frame,
                        },
                    }
                };
                // Past the bound: to the original client alone, as fast as it reads.
                if let Some(sender) = &tx {
                    if sender.send(frame).await.is_err() {
                        tx = None;
                    }
                }
            }
        })
        .await;
    if let Some(appending) = appending {
        appending.stop().await;
    }
    storing.registry.remove(&key, &live);
    match read {
        Ok(Ok((trailers, tx))) => {
            let config = &storing.config;
            let overflowed = live.lock().overflowed;
            let record = {
                let mut state = live.lock();
                let mut held = 0;
                if !overflowed {
                    for chunk in state.chunks.iter_mut() {
                        held += capture::held_alone(chunk);
                    }
                }
                record::record(
                    storing.fingerprint,
                    live.status,
                    &head,
                    |name| config.stores_header(name),
                    &storing.carried,
                    (!overflowed).then(|| state.chunks.iter()),
                    trailers.as_ref().filter(|_| !overflowed),
                )
                .holding_body(held)
            };
            let outcome: Outcome = guard.complete_for(record, storing.ttl).await.into();
            live.update(|state| state.end = Some(End::Done(trailers)));
            drop(tx);
            storing.hook.fire(outcome);
        }
        failed => {
            let reason = match failed {
                Ok(Err(error)) => {
                    let error: BoxError = error;
                    tracing::error!(outcome = "not_stored", reason = "body_error", %error,
                        "streamed response body failed; releasing the key");
                    ReleaseReason::BodyError
                }
                _ => ReleaseReason::Panic,
            };
            let outcome = if storing.points.unsaved() {
                tracing::error!(
                    outcome = "stored",
                    "a recovery point was not saved and the stream failed; storing 500 #progress-unsaved instead of releasing the key"
                );
                guard
                    .complete_for(storing.unsaved, storing.ttl)
                    .await
                    .into()
            } else {
                guard.release().await;
                Outcome::Released(reason)
            };
            live.update(|state| state.end = Some(End::Failed));
            storing.hook.fire(outcome);
        }
    }
}

/// Ends a stream whose pump went away before ending it: it is taken off the registry and its
/// readers fail.
struct Ending {
    live: Arc<Live>,
    registry: Arc<Registry>,
    key: Arc<str>,
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.registry.remove(&self.key, &self.live);
        if self.live.lock().end.is_none() {
            self.live.update(|state| state.end = Some(End::Failed));
        }
    }
}

/// How often, at most, a streaming original appends its new chunks to the store for
/// duplicates on other instances ([`Store::append_stream`]), unless [`APPEND_BYTES`] came first.
const APPEND_EVERY: Duration = Duration::from_millis(50);
/// Kept chunks of this many bytes are appended at once, without waiting for [`APPEND_EVERY`].
const APPEND_BYTES: usize = 64 * 1024;
/// A duplicate following a stream in the store reads it again after this long when it found
/// nothing new, doubling up to [`POLL_CAP`] (and back to it once it finds chunks).
const POLL_FIRST: Duration = Duration::from_millis(5);
/// The longest a follower waits between two reads of the store.
const POLL_CAP: Duration = Duration::from_millis(50);

/// Chunk 0 of a stream in the store: the integrity envelope (`store::seal`, magic `"TJ"`)
/// around `has-fingerprint:u8 fingerprint:u128` and the head encoded as a record with an
/// empty body (`record::encode`): the status and the stored headers.
const HEAD_MAGIC: &[u8; 2] = b"TJ";
const HEAD_VERSION: u8 = 1;

/// The head of `live` as chunk 0 of its stream in the store.
fn head_chunk(live: &Live) -> Bytes {
    use bytes::BufMut;
    let (head, _) = record::encode(
        live.status,
        &live.headers,
        |_| true,
        &[],
        Some(std::iter::empty::<&Bytes>()),
        None,
    );
    let mut buf = seal::start(HEAD_MAGIC, HEAD_VERSION, 17 + head.len());
    buf.put_u8(u8::from(live.fingerprint.is_some()));
    buf.put_u128(live.fingerprint.unwrap_or(0));
    buf.put_slice(&head);
    seal::finish(buf)
}

/// The stream whose chunk 0 is `chunk` ([`head_chunk`]), with no chunk yet: damaged bytes
/// (cut, flipped, another thing) are refused, never answered.
fn read_head(chunk: &Bytes) -> Result<Live, Unreadable> {
    const DAMAGED: Unreadable = Unreadable::Damaged("a live stream's head is malformed");
    if chunk.len() < 3 || &chunk[..2] != HEAD_MAGIC {
        return Err(DAMAGED);
    }
    match chunk[2] {
        HEAD_VERSION => {}
        newer if newer > HEAD_VERSION => return Err(Unreadable::Newer(newer)),
        _ => return Err(DAMAGED),
    }
    let at = seal::check(chunk, true)?;
    let content = &chunk[at..];
    if content.len() < 17 || content[0] > 1 {
        return Err(DAMAGED);
    }
    let fingerprint = (content[0] == 1)
        .then(|| u128::from_be_bytes(content[1..17].try_into().expect("16 bytes")));
    let head = record::decode(&chunk.slice(at + 17..))?;
    if head.body_omitted || !head.body.is_empty() || head.trailers.is_some() {
        return Err(DAMAGED);
    }
    Ok(Live {
        status: head.status,
        event_stream: sse::is_event_stream(&head.headers),
        headers: head.headers,
        fingerprint,
        state: Mutex::default(),
    })
}

/// A streaming original's appender task ([`append`]), and how the pump drives it.
struct Appending {
    task: tokio::task::JoinHandle<()>,
    /// Ends the task (after the append under way, if any).
    stop: Arc<Notify>,
    /// Appends now: [`APPEND_BYTES`] were kept since the last wake.
    wake: Arc<Notify>,
}

impl Appending {
    /// Starts appending `live` to the claim's store, unless the store said it keeps no streams.
    fn start<St: Store + Clone>(
        guard: &ClaimGuard<St>,
        live: &Arc<Live>,
        ttl: Duration,
        registry: &Arc<Registry>,
    ) -> Option<Self> {
        if !registry.store_streams() {
            return None;
        }
        let (store, timeout) = guard.store();
        let (stop, wake) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let appender = Appender {
            store: store.clone(),
            key: guard.key().into(),
            token: guard.token(),
            live: live.clone(),
            ttl,
            timeout,
            registry: registry.clone(),
        };
        let task = appender.run(head_chunk(live), stop.clone(), wake.clone());
        let task = tokio::spawn(task.instrument(tracing::Span::current()));
        Some(Self { task, stop, wake })
    }

    /// Stops appending and waits for the append under way: the completion or release that
    /// follows then finds every chunk that was written (and removes the stream).
    async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

/// What the appender task holds.
struct Appender<St> {
    store: St,
    key: Arc<str>,
    token: OwnerToken,
    live: Arc<Live>,
    ttl: Duration,
    timeout: Duration,
    registry: Arc<Registry>,
}

impl<St: Store> Appender<St> {
    /// Appends chunk 0 (`head`) and the chunks kept so far at once, then the new ones every
    /// [`APPEND_EVERY`] (or on `wake`), until `stop`, the bound, the stream's end, or the
    /// first failure (logged; joiners elsewhere then wait for the record). Never fails the
    /// original.
    async fn run(self, head: Bytes, stop: Arc<Notify>, wake: Arc<Notify>) {
        // Body chunks in the store (after chunk 0), once chunk 0 is.
        let mut sent: Option<usize> = None;
        loop {
            let batch = {
                let state = self.live.lock();
                if state.overflowed || state.end.is_some() {
                    return;
                }
                let new = &state.chunks[sent.unwrap_or(0)..];
                let mut batch = Vec::with_capacity(new.len() + 1);
                if sent.is_none() {
                    batch.push(head.clone());
                }
                batch.extend(new.iter().cloned());
                batch
            };
            if !batch.is_empty() {
                let from = sent.map_or(0, |sent| 1 + sent as u64);
                let append =
                    self.store
                        .append_stream(&self.key, &self.token, from, &batch, self.ttl);
                match protocol::bounded(self.timeout, append).await {
                    Ok(()) => {
                        let body = batch.len() - usize::from(sent.is_none());
                        sent = Some(sent.unwrap_or(0) + body);
                    }
                    Err(Failure::Store(StoreError::Unsupported(_))) => {
                        self.registry.unsupported.store(true, Ordering::Relaxed);
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(
                            outcome = "stream_not_appended",
                            %error,
                            "appending the live stream to the store failed; duplicates on other instances wait for the record"
                        );
                        return;
                    }
                }
            }
            tokio::select! {
                biased;
                () = stop.notified() => return,
                () = wake.notified() => {}
                () = tokio::time::sleep(APPEND_EVERY) => {}
            }
        }
    }
}

/// What [`find`] found.
pub(crate) enum Found {
    /// The stream to join.
    Join(Arc<Live>),
    /// Nothing to join: the key completed or was released, the store keeps no streams or
    /// failed, or no stream appeared within the wait bound. The caller waits (claims) as
    /// `Wait` does, for what is left of its bound after this long.
    Wait(Duration),
}

/// A duplicate that found `key` in flight and no stream of it here: reads its stream in the
/// store, again while the key is in flight without one (the original has not answered its
/// head, or its first append is under way), polling as a follower does, up to the wait bound.
/// A stream found there is followed from the store by a task, and shared here by later
/// duplicates; one that starts here meanwhile is joined here. `Err` when its head is damaged.
pub(crate) async fn find<St: Store + Clone>(
    store: &St,
    key: &str,
    timings: &Timings,
    registry: &Arc<Registry>,
) -> Result<Found, Unreadable> {
    let started = tokio::time::Instant::now();
    let bound = timings.wait.unwrap_or_default();
    let mut delay = POLL_FIRST;
    let chunks = loop {
        if let Some(live) = registry.get(key) {
            return Ok(Found::Join(live));
        }
        if !registry.store_streams() {
            return Ok(Found::Wait(started.elapsed()));
        }
        let read = store.read_stream(key, 0);
        match protocol::bounded(timings.store_timeout, read).await {
            Ok(StreamRead::Live(chunks)) if !chunks.is_empty() => break chunks,
            Ok(StreamRead::Live(_) | StreamRead::NotLive) => {}
            Err(Failure::Store(StoreError::Unsupported(_))) => {
                registry.unsupported.store(true, Ordering::Relaxed);
                return Ok(Found::Wait(started.elapsed()));
            }
            // Completed, released, a store error: the claim that follows finds out.
            _ => return Ok(Found::Wait(started.elapsed())),
        }
        if started.elapsed() + delay >= bound {
            return Ok(Found::Wait(started.elapsed()));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(POLL_CAP);
    };
    let mut chunks = chunks.into_iter();
    let head = chunks.next().expect("not empty");
    let live = match read_head(&head) {
        Ok(live) => live,
        // A newer release's stream: this build cannot follow it, and waits for the record.
        Err(Unreadable::Newer(_)) => return Ok(Found::Wait(started.elapsed())),
        Err(damaged) => {
            seal::report(
                seal::identity(key.as_bytes()),
                damaged,
                &"a live stream's chunk 0",
            );
            return Err(damaged);
        }
    };
    live.lock().chunks.extend(chunks);
    let live = Arc::new(live);
    let key: Arc<str> = key.into();
    registry.insert(key.clone(), live.clone());
    let follower = Follower {
        store: store.clone(),
        key,
        live: live.clone(),
        registry: registry.clone(),
        timeout: timings.store_timeout,
        patience: timings.lease,
    };
    tokio::spawn(follower.run().instrument(tracing::Span::current()));
    Ok(Found::Join(live))
}

/// A task following a stream in the store into a [`Live`] of this instance, for its joiners.
struct Follower<St> {
    store: St,
    key: Arc<str>,
    live: Arc<Live>,
    registry: Arc<Registry>,
    timeout: Duration,
    /// How long the store may fail before the joiners are failed.
    patience: Duration,
}

impl<St: Store> Follower<St> {
    /// Reads the stream's new chunks (polling, [`POLL_FIRST`] doubling to [`POLL_CAP`]) until
    /// the key completes (the rest of the record's body), or its stream goes away (the
    /// original failed or lapsed: the joiners fail), or no joiner is left.
    async fn run(self) {
        let Self {
            store,
            key,
            live,
            registry,
            timeout,
            patience,
        } = self;
        let _ending = Ending {
            live: live.clone(),
            registry: registry.clone(),
            key: key.clone(),
        };
        let mut next = 1 + live.lock().chunks.len() as u64;
        let mut delay = POLL_FIRST;
        let mut failing_since = None;
        let end = loop {
            // Held here twice (`live`, `_ending`) and by the registry: no joiner left.
            if Arc::strong_count(&live) <= 3 {
                registry.remove(&key, &live);
                if Arc::strong_count(&live) <= 2 {
                    return;
                }
            }
            match protocol::bounded(timeout, store.read_stream(&key, next)).await {
                Ok(StreamRead::Live(chunks)) => {
                    failing_since = None;
                    if !chunks.is_empty() {
                        next += chunks.len() as u64;
                        live.update(|state| state.chunks.extend(chunks));
                        delay = POLL_FIRST;
                        continue;
                    }
                }
                Ok(StreamRead::Completed(record)) => break completed(&live, &record),
                Ok(_) => {
                    tracing::info!(
                        outcome = "join_failed",
                        "the followed stream went away before its record was stored; ending the duplicate with an error"
                    );
                    break End::Failed;
                }
                Err(error) => {
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > patience {
                        tracing::error!(outcome = "join_failed", %error,
                            "the store failed while a duplicate followed a stream; ending it with an error");
                        break End::Failed;
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(POLL_CAP);
        };
        registry.remove(&key, &live);
        live.update(|state| state.end = Some(end));
    }
}

/// The end of a followed stream whose key completed with `record`: the rest of its body after
/// what was followed so far, and its trailers. A record that cannot be read, that kept no
/// body (past the bound), or whose body does not start where the stream was, fails.
fn completed(live: &Live, record: &Record) -> End {
    let response = match record::decode_record(record, 0, true) {
        Ok(response) if !response.body_omitted => response,
        _ => {
            tracing::info!(
                outcome = "join_failed",
                "the followed stream's record has no body to end it with; ending the duplicate with an error"
            );
            return End::Failed;
        }
    };
    let mut skip: usize = live.lock().chunks.iter().map(Bytes::len).sum();
    let mut rest = Vec::new();
    for chunk in response.body.iter() {
        if skip >= chunk.len() {
            skip -= chunk.len();
        } else {
            rest.push(chunk.slice(skip..));
            skip = 0;
        }
    }
    if skip > 0 {
        return End::Failed;
    }
    live.update(|state| state.chunks.extend(rest));
    End::Done(response.trailers)
}
