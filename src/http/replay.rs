//! Answering a duplicate of a completed request: compare its fingerprint, then replay the
//! stored response (or refuse it with 422).

use http::header::{HeaderValue, CONTENT_TYPE};
use std::time::Duration;

use http::{HeaderMap, HeaderName, Response};
use http_body::Body;
use std::sync::Arc;

use super::fingerprint::{self, FingerprintHasher, HashError};
use super::problem::{Problem, ProblemKind};
use super::record;
use super::response_body::ResponseBody;
use crate::protocol::{self, Outcome};
use crate::store::seal::{self, Unreadable};
use crate::store::{Chunks, Memo, Record};
use crate::BoxError;

/// The header every replay carries (`idempotent-replayed: true`).
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The header a replay carries when the original body was too large to keep.
pub const BODY_OMITTED_HEADER: HeaderName = HeaderName::from_static("idempotent-body-omitted");

/// How the layer answers a duplicate: which carried request headers a replay restores (and
/// under which names), the `Retry-After` of a 503, and whether it is a gRPC call.
pub(crate) struct Answering<'a> {
    pub(crate) carried: &'a [(HeaderName, HeaderName)],
    pub(crate) retry_after: Duration,
    pub(crate) grpc: bool,
}

/// A duplicate of a completed request: replay, or 422 when the payload differs (413 when its
/// body is over `body_limit`; `None`: the fingerprint does not cover the body).
///
/// An `async` block, not an `async fn`, for the reason given at the keyed request's `run`: its
/// arguments (a record, the body, the hasher) would be kept twice in every replay's state.
#[allow(clippy::manual_async_fn)]
pub(crate) fn duplicate<'a, ReqBody, ResBody>(
    record: Record,
    body: ReqBody,
    hasher: Option<FingerprintHasher>,
    body_limit: Option<u64>,
    answering: Answering<'a>,
) -> impl std::future::Future<Output = (Response<ResponseBody<ResBody>>, Outcome)> + 'a
where
    ReqBody: Body + 'a,
    ReqBody::Error: Into<BoxError>,
{
    async move {
        let grpc = answering.grpc;
        if let Some(refusal) = refused(record.fingerprint(), body, hasher, body_limit, grpc).await {
            return refusal;
        }
        // A payload that never left this process needs no checksum (the memory store's).
        let checksum = !record.in_process();
        let decoded = match record.memo() {
            // A record the store keeps decoded: decoded by its first replay only.
            Some(memo) => remembered(memo, &record, checksum).map(Decoded::Shared),
            None => {
                record::decode_record(&record, record::REPLAY_ADDS, checksum).map(Decoded::Owned)
            }
        };
        match decoded {
            // A gRPC answer too large to keep: no replay is a gRPC answer without its message,
            // and the call is not run again (see `#answer-not-stored`).
            Ok(stored) if grpc && stored.body_omitted() => {
                tracing::info!(
                    outcome = "replayed",
                    "gRPC answer was too large to store; answering FAILED_PRECONDITION"
                );
                let problem = Problem::Plain(ProblemKind::AnswerNotStored);
                (problem.respond(grpc), Outcome::Replayed)
            }
            Ok(stored) => {
                tracing::debug!(
                    outcome = "replayed",
                    status = stored.status().as_u16(),
                    "replaying stored response"
                );
                (replay(stored, answering.carried), Outcome::Replayed)
            }
            Err(unreadable) => {
                seal::report(seal::identity(record.payload()), unreadable, &unreadable);
                unreadable_record(unreadable, answering.retry_after, grpc)
            }
        }
    }
}

/// A duplicate's payload compared with the original's fingerprint `stored`: `None` when it is
/// the same (or either side has none), else the refusal to answer (422, 413 over `body_limit`,
/// 400 for a body that failed). (An `async` block, for the reason given at [`duplicate`].)
#[allow(clippy::manual_async_fn)]
pub(crate) fn refused<ReqBody, ResBody>(
    stored: Option<u128>,
    body: ReqBody,
    hasher: Option<FingerprintHasher>,
    body_limit: Option<u64>,
    grpc: bool,
) -> impl std::future::Future<Output = Option<(Response<ResponseBody<ResBody>>, Outcome)>>
where
    ReqBody: Body,
    ReqBody::Error: Into<BoxError>,
{
    async move {
        if let (Some(stored), Some(hasher)) = (stored, hasher) {
            let hashed = match body_limit {
                Some(limit) => fingerprint::hash_body(body, hasher, limit).await,
                None => Ok(hasher.finish()),
            };
            match hashed {
                Ok(fingerprint) if protocol::same_payload(Some(stored), Some(fingerprint)) => {}
                Ok(_) => {
                    return Some((
                        Problem::Plain(ProblemKind::KeyReused).respond(grpc),
                        Outcome::Mismatch,
                    ))
                }
                Err(HashError::TooLarge) => {
                    tracing::info!(
                        outcome = "body_too_large",
                        limit = body_limit,
                        "duplicate's body over the limit"
                    );
                    return Some((
                        Problem::Plain(ProblemKind::BodyTooLarge).respond(grpc),
                        Outcome::BodyTooLarge,
                    ));
                }
                Err(HashError::Body(error)) => {
                    tracing::debug!(outcome = "unreadable_body", %error, "duplicate's body failed");
                    return Some((
                        Problem::Plain(ProblemKind::UnreadableBody).respond(grpc),
                        Outcome::Unreadable,
                    ));
                }
            }
        }
        None
    }
}

/// A decoded response: this replay's own, or one kept with the record for every replay.
// Lives on the stack for one replay; boxing the owned one would cost an allocation each time.
#[allow(clippy::large_enum_variant)]
enum Decoded {
    Owned(record::StoredResponse),
    Shared(Arc<record::StoredResponse>),
}

impl Decoded {
    fn status(&self) -> http::StatusCode {
        match self {
            Decoded::Owned(stored) => stored.status,
            Decoded::Shared(stored) => stored.status,
        }
    }

    fn body_omitted(&self) -> bool {
        match self {
            Decoded::Owned(stored) => stored.body_omitted,
            Decoded::Shared(stored) => stored.body_omitted,
        }
    }
}

/// The decoded form kept in `memo`, decoding `record` into it the first time. A record that
/// cannot be decoded keeps nothing (each replay reports it).
fn remembered(
    memo: &Memo,
    record: &Record,
    checksum: bool,
) -> Result<Arc<record::StoredResponse>, Unreadable> {
    if let Some(kept) = memo.get() {
        if let Ok(stored) = Arc::clone(kept).downcast::<record::StoredResponse>() {
            return Ok(stored);
        }
    }
    let mut stored = record::decode_record(record, record::REPLAY_ADDS, checksum)?;
    mark_replay(&mut stored.headers, stored.body_omitted);
    let stored = Arc::new(stored);
    // Another replay may have filled it meanwhile: both decoded the same bytes.
    let _ = memo.set(stored.clone());
    Ok(stored)
}

/// What every replay of `stored` shows whatever the layer's settings: `idempotent-replayed`,
/// and for a body too large to keep, the marker in place of its `content-type`. A kept
/// decoded form holds them already, so that its replays copy the header map as it is.
#[inline]
fn mark_replay(headers: &mut HeaderMap, body_omitted: bool) {
    if body_omitted {
        headers.remove(CONTENT_TYPE);
        headers.insert(BODY_OMITTED_HEADER, HeaderValue::from_static("true"));
    }
    headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
}

/// The answer to a record that exists but cannot be read: the handler is not run. Damaged:
/// 500 (no retry will read it); from a newer release: 503 with `Retry-After` (an up-to-date
/// instance will).
pub(crate) fn unreadable_record<B>(
    unreadable: Unreadable,
    retry_after: Duration,
    grpc: bool,
) -> (Response<ResponseBody<B>>, Outcome) {
    let problem = match unreadable {
        Unreadable::Damaged(_) => Problem::Plain(ProblemKind::UnreadableRecord),
        Unreadable::Newer(_) => Problem::RetryAfter(ProblemKind::UnknownRecordVersion, retry_after),
    };
    (problem.respond(grpc), Outcome::Unreadable)
}

/// Builds the replay of a stored response.
fn replay<B>(decoded: Decoded, carried: &[(HeaderName, HeaderName)]) -> Response<ResponseBody<B>> {
    match decoded {
        Decoded::Owned(stored) => {
            let mut response = ready(stored.status, stored.headers, stored.body, stored.trailers);
            let headers = response.headers_mut();
            carry(headers, &stored.carried, carried);
            mark_replay(headers, stored.body_omitted);
            response
        }
        // Marked when it was kept: its header map is copied as it is (one allocation for the
        // entries, one for the index, no header hashed again).
        Decoded::Shared(kept) => {
            let mut response = ready(
                kept.status,
                kept.headers.clone(),
                kept.body.clone(),
                kept.trailers.clone(),
            );
            // Carried after the marks: their replayed names (`original-*`) never meet them.
            carry(response.headers_mut(), &kept.carried, carried);
            response
        }
    }
}

/// The original's request headers the layer (still) carries, under their replayed names. The
/// layer's choice, not the record's: applied to each replay, never kept decoded.
#[inline]
fn carry(
    headers: &mut HeaderMap,
    stored: &[(HeaderName, HeaderValue)],
    carried: &[(HeaderName, HeaderName)],
) {
    for (name, value) in stored {
        if let Some((_, replayed)) = carried.iter().find(|(carried, _)| carried == name) {
            headers.insert(replayed.clone(), value.clone());
        }
    }
}

/// A response of `status` with `headers`, answering `body` then `trailers`.
#[inline]
fn ready<B>(
    status: http::StatusCode,
    headers: HeaderMap,
    body: Chunks,
    trailers: Option<HeaderMap>,
) -> Response<ResponseBody<B>> {
    let body = match body {
        Chunks::One(body) => ResponseBody::full_with_trailers(body, trailers),
        Chunks::Many(chunks) => ResponseBody::chunks(chunks, trailers),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_decoded_form_is_decoded_once_and_shared() {
        let mut headers = HeaderMap::new();
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        let body = bytes::Bytes::from_static(b"{}");
        let record = record::record(
            None,
            http::StatusCode::CREATED,
            &headers,
            |_| true,
            &[],
            Some(std::iter::once(&body)),
            None,
        );
        let memo = Memo::new();
        let first = remembered(&memo, &record, true).unwrap();
        let again = remembered(&memo, &record, true).unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "the second replay decodes nothing"
        );
        let response = replay::<()>(Decoded::Shared(again), &[]);
        let cookies: Vec<_> = response.headers().get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"], "every value of a repeated header");
        assert_eq!(response.headers()[REPLAYED_HEADER], "true");
        assert!(memo.get().is_some());
    }

    #[test]
    fn a_record_that_does_not_decode_keeps_nothing() {
        let memo = Memo::new();
        let junk = Record::new(None, bytes::Bytes::from_static(b"TI\x03junk"));
        assert!(remembered(&memo, &junk, true).is_err());
        assert!(memo.get().is_none());
    }
}
