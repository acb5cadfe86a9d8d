//! Problem details (RFC 9457) for every answer the layer gives on its own.
//!
//! Each has `type`, `title`, `status` and `detail`, as `application/problem+json`. Details
//! describe the client's request, never the store's internals.
//!
//! | status | `type` ends with | when |
//! |--------|------------------|------|
//! | 400 | `#missing-key` | the key is required and absent |
//! | 400 | `#invalid-key` | empty, too long, non-ASCII or control characters, a broken quoted string, or several `Idempotency-Key` fields |
//! | 400 | `#unreadable-body` | the duplicate's body failed while it was being read |
//! | 409 | `#in-flight` | the original request with this key is still running (carries `Retry-After`) |
//! | 422 | `#key-reused` | the key was used before with another payload |
//! | 500 | `#handler-panicked` | the handler panicked (the key is released) |
//! | 500 | `#response-failed` | the handler's response body failed (the key is released) |
//! | 500 | `#unreadable-record` | the stored response cannot be decoded |
//! | 503 | `#store-unavailable` | the store failed or was slower than the store timeout (carries `Retry-After`) |
//! | 503 | `#shutting-down` | the server is draining ([`DrainHandle`](crate::DrainHandle)); retry elsewhere (carries `Retry-After`) |

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use super::key::KeyError;
use super::response_body::ResponseBody;

const TYPE_BASE: &str =
    "https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/index.html";

/// One kind of problem the layer answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    MissingKey,
    InvalidKey(KeyError),
    UnreadableBody,
    InFlight(Duration),
    KeyReused,
    HandlerPanicked,
    ResponseFailed,
    UnreadableRecord,
    StoreUnavailable(Duration),
    ShuttingDown(Duration),
}

impl Problem {
    fn parts(&self) -> (StatusCode, &'static str, &'static str, Cow<'static, str>) {
        use Problem::*;
        match self {
            MissingKey => (
                StatusCode::BAD_REQUEST,
                "missing-key",
                "Idempotency key required",
                "This endpoint requires an Idempotency-Key header.".into(),
            ),
            InvalidKey(error) => (StatusCode::BAD_REQUEST, "invalid-key", "Invalid idempotency key", sentence(error)),
            UnreadableBody => (
                StatusCode::BAD_REQUEST,
                "unreadable-body",
                "Request body could not be read",
                "The request body failed before it could be compared with the original request.".into(),
            ),
            InFlight(_) => (
                StatusCode::CONFLICT,
                "in-flight",
                "Request in progress",
                "A request with this idempotency key is still being processed; retry later with the same key.".into(),
            ),
            KeyReused => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "key-reused",
                "Idempotency key reused",
                "This idempotency key was already used with a different request payload.".into(),
            ),
            HandlerPanicked => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "handler-panicked",
                "Internal server error",
                "The request failed; it was not recorded and may be retried with the same key.".into(),
            ),
            ResponseFailed => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "response-failed",
                "Internal server error",
                "The response could not be produced; it was not recorded and may be retried with the same key.".into(),
            ),
            UnreadableRecord => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "unreadable-record",
                "Stored response unreadable",
                "The response stored for this idempotency key cannot be replayed.".into(),
            ),
            StoreUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Idempotency store unavailable",
                "The request was not processed because its idempotency key could not be checked; retry later with the same key.".into(),
            ),
            ShuttingDown(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting-down",
                "Server shutting down",
                "This server is shutting down and did not process the request; retry with the same key (another instance will take it).".into(),
            ),
        }
    }

    /// The HTTP answer.
    pub(crate) fn into_response<B>(self) -> Response<ResponseBody<B>> {
        let (status, slug, title, detail) = self.parts();
        let body = serde_json::json!({
            "type": format!("{TYPE_BASE}#{slug}"),
            "title": title,
            "status": status.as_u16(),
            "detail": detail,
        });
        let mut response = Response::new(ResponseBody::full(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Problem::InFlight(after)
        | Problem::StoreUnavailable(after)
        | Problem::ShuttingDown(after) = &self
        {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

/// A key error as a sentence: capitalised, with a full stop.
fn sentence(error: &KeyError) -> Cow<'static, str> {
    let text = error.to_string();
    let mut chars = text.chars();
    let first = chars.next().map(|c| c.to_ascii_uppercase());
    Cow::Owned(first.into_iter().chain(chars).chain(['.']).collect())
}
