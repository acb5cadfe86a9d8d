//! Answering a duplicate of a completed request: compare its fingerprint, then replay the
//! stored response (or refuse it with 422).

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderName, Response};
use http_body::Body;

use super::fingerprint::{self, FingerprintHasher, HashError};
use super::layer::Config;
use super::problem::{Problem, ProblemKind};
use super::record;
use super::response_body::ResponseBody;
use crate::protocol::seal::{self, Unreadable};
use crate::protocol::{self, Outcome};
use crate::store::Record;
use crate::BoxError;

/// The header every replay carries (`idempotent-replayed: true`).
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The header a replay carries when the original body was too large to keep.
pub const BODY_OMITTED_HEADER: HeaderName = HeaderName::from_static("idempotent-body-omitted");

/// A duplicate of a completed request: replay, or 422 when the payload differs (413 when its
/// body is too large to compare).
pub(crate) async fn duplicate<ReqBody, ResBody>(
    config: &Config,
    record: Record,
    body: ReqBody,
    hasher: Option<FingerprintHasher>,
    grpc: bool,
) -> (Response<ResponseBody<ResBody>>, Outcome)
where
    ReqBody: Body,
    ReqBody::Error: Into<BoxError>,
{
    if let (Some(stored), Some(hasher)) = (record.fingerprint(), hasher) {
        let hashed = if config.fingerprint.covers_body() {
            fingerprint::hash_body(body, hasher, config.max_duplicate_body).await
        } else {
            Ok(hasher.finish())
        };
        match hashed {
            Ok(fingerprint) if protocol::same_payload(Some(stored), Some(fingerprint)) => {}
            Ok(_) => {
                return (
                    Problem::Plain(ProblemKind::KeyReused).respond(grpc),
                    Outcome::Mismatch,
                )
            }
            Err(HashError::TooLarge) => {
                tracing::info!(
                    outcome = "body_too_large",
                    limit = config.max_duplicate_body,
                    "duplicate's body over the limit"
                );
                return (
                    Problem::Plain(ProblemKind::BodyTooLarge).respond(grpc),
                    Outcome::BodyTooLarge,
                );
            }
            Err(HashError::Body(error)) => {
                tracing::debug!(outcome = "unreadable_body", %error, "duplicate's body failed");
                return (
                    Problem::Plain(ProblemKind::UnreadableBody).respond(grpc),
                    Outcome::Unreadable,
                );
            }
        }
    }
    let payload = record.into_payload();
    match record::decode(payload.clone()) {
        Ok(stored) => {
            tracing::debug!(
                outcome = "replayed",
                status = stored.status.as_u16(),
                "replaying stored response"
            );
            (replay(stored, config), Outcome::Replayed)
        }
        Err(unreadable) => {
            seal::report(seal::identity(&payload), unreadable, &unreadable);
            unreadable_record(unreadable, config, grpc)
        }
    }
}

/// The answer to a record that exists but cannot be read: the handler is not run. Damaged:
/// 500 (no retry will read it); from a newer release: 503 with `Retry-After` (an up-to-date
/// instance will).
pub(crate) fn unreadable_record<B>(
    unreadable: Unreadable,
    config: &Config,
    grpc: bool,
) -> (Response<ResponseBody<B>>, Outcome) {
    let problem = match unreadable {
        Unreadable::Damaged(_) => Problem::Plain(ProblemKind::UnreadableRecord),
        Unreadable::Newer(_) => {
            Problem::RetryAfter(ProblemKind::UnknownRecordVersion, config.retry_after)
        }
    };
    (problem.respond(grpc), Outcome::Unreadable)
}

/// Builds the replay of a stored response.
fn replay<B>(stored: record::StoredResponse, config: &Config) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::full_with_trailers(
        stored.body,
        stored.trailers,
    ));
    *response.status_mut() = stored.status;
    let headers = response.headers_mut();
    *headers = stored.headers;
    for (name, value) in stored.carried {
        // Only headers the layer (still) carries are replayed.
        if let Some((_, replayed)) = config.carried.iter().find(|(carried, _)| *carried == name) {
            headers.insert(replayed.clone(), value);
        }
    }
    if stored.body_omitted {
        headers.remove(CONTENT_TYPE);
        headers.insert(BODY_OMITTED_HEADER, HeaderValue::from_static("true"));
    }
    headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}
