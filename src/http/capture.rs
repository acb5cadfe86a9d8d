//! Capturing the original's answer: which answers are stored, reading a storable body up to
//! the limit, and turning it into a record.

use std::collections::VecDeque;
use std::pin::Pin;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL};
use http::request::Parts;
use http::{HeaderName, Response};
use http_body::{Body, Frame};

use super::layer::Config;
use super::record;
use crate::protocol::ReleaseReason;
use crate::store::Record;
use crate::BoxError;

/// Marks a response that must not be stored: put it in the response's extensions. The key is
/// released, as for `Cache-Control: no-store`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoStore;

/// What the handler produced, read up to the storage limit.
pub(crate) enum Produced<B> {
    /// Not to be stored: released and returned untouched.
    Unstored(Response<B>, ReleaseReason),
    /// Storable: the head, the frames read, the rest of the body, and whether the frames are
    /// the whole body (else it was larger than the limit).
    Storable(Captured<B>),
    /// The body failed while being read.
    Failed(BoxError),
}

/// A storable answer, read up to the limit.
pub(crate) struct Captured<B> {
    pub(crate) head: http::response::Parts,
    pub(crate) frames: VecDeque<Frame<Bytes>>,
    pub(crate) rest: Pin<Box<B>>,
    pub(crate) whole: bool,
}

/// Request headers of the original that replays carry (`x-request-id` by default).
pub(crate) fn carried_headers(parts: &Parts, config: &Config) -> Vec<(HeaderName, HeaderValue)> {
    config
        .carried
        .iter()
        .filter_map(|(name, _)| parts.headers.get(name).map(|v| (name.clone(), v.clone())))
        .collect()
}

/// Reads a storable response's body up to the limit; anything else is returned untouched.
pub(crate) async fn read<B>(response: Response<B>, config: &Config) -> Produced<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if !(config.store_status)(response.status()) {
        return Produced::Unstored(response, ReleaseReason::Status);
    }
    if response.extensions().get::<NoStore>().is_some() || has_no_store(response.headers()) {
        return Produced::Unstored(response, ReleaseReason::NoStore);
    }
    let (head, body) = response.into_parts();
    let limit = config.max_response_body as u64;
    let mut frames = VecDeque::new();
    let mut rest = Box::pin(body);
    let mut whole = rest.size_hint().lower() <= limit;
    let mut read = 0u64;
    while whole {
        match std::future::poll_fn(|cx| rest.as_mut().poll_frame(cx)).await {
            None => break,
            Some(Err(error)) => return Produced::Failed(error.into()),
            Some(Ok(frame)) => {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                frames.push_back(frame);
                whole = read <= limit;
            }
        }
    }
    if !whole {
        tracing::info!(
            outcome = "body_omitted",
            limit = config.max_response_body,
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
    pub(crate) fn record(
        &self,
        fingerprint: Option<u128>,
        carried: &[(HeaderName, HeaderValue)],
        config: &Config,
    ) -> Record {
        let keep = |name: &HeaderName| config.stores_header(name);
        let body = self
            .whole
            .then(|| self.frames.iter().filter_map(Frame::data_ref));
        let payload = record::encode(self.head.status, &self.head.headers, keep, carried, body);
        Record::new(fingerprint, payload)
    }
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
