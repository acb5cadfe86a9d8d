//! Problem details (RFC 9457) for every answer the layer gives on its own.
//!
//! Each has `type`, `title`, `status` and `detail`, as `application/problem+json`. Details
//! describe the client's request, never the store's internals.
//!
//! | status | `type` ends with | when |
//! |--------|------------------|------|
//! | 400 | [`#missing-key`](#missing-key) | the key is required and absent |
//! | 400 | [`#invalid-key`](#invalid-key) | empty, too long, non-ASCII or control characters, a comma in a bare key, a broken quoted string, or several `Idempotency-Key` fields |
//! | 400 | [`#unreadable-body`](#unreadable-body) | the duplicate's body failed while it was being read |
//! | 409 | [`#in-flight`](#in-flight) | the original request with this key is still running (carries `Retry-After`) |
//! | 413 | [`#body-too-large`](#body-too-large) | a duplicate's body is over `max_duplicate_body` [[`defaults::MAX_DUPLICATE_BODY`](crate::defaults::MAX_DUPLICATE_BODY)] |
//! | 422 | [`#key-reused`](#key-reused) | the key was used before with another payload (or its recovery point was saved by one) |
//! | 500 | [`#missing-scope`](#missing-scope) | the scope function returned `None` (authentication must run before the layer) |
//! | 500 | [`#handler-panicked`](#handler-panicked) | the handler panicked (the key is released) |
//! | 500 | [`#response-failed`](#response-failed) | the handler's response body failed (the key is released) |
//! | 500 | [`#progress-unsaved`](#progress-unsaved) | the handler failed after a recovery point could not be saved: the key is kept, not released |
//! | 409 | [`#answer-not-stored`](#answer-not-stored) | gRPC only (`FAILED_PRECONDITION`): a duplicate of a call that succeeded with an answer over `max_stored_body`, which was not stored |
//! | 500 | [`#unreadable-record`](#unreadable-record) | the stored record is damaged (cut, changed, malformed): the key was used, so the handler is not run, under any store-error policy |
//! | 503 | [`#unknown-record-version`](#unknown-record-version) | the stored record was written by a newer release (a rolling upgrade): the handler is not run; retry later (carries `Retry-After`) |
//! | 503 | [`#store-unavailable`](#store-unavailable) | the store failed or was slower than the store timeout (carries `Retry-After`) |
//! | 503 | [`#shutting-down`](#shutting-down) | the server is draining ([`DrainHandle`](crate::DrainHandle)); retry elsewhere (carries `Retry-After`) |
//! | 503 | [`#overloaded`](#overloaded) | too many requests run on after their clients left (`max_detached`) (carries `Retry-After`) |
//!
//! # Problem types
//!
//! The `type` URI of each problem ([`ProblemKind::type_uri`]) ends with one of the anchors below,
//! on this page.
//!
//! ## missing-key
//!
//! 400: The key is required and absent. Send an `Idempotency-Key` header.
//!
//! ## invalid-key
//!
//! 400: Empty, too long, non-ASCII or control characters, a comma in a bare key, a broken quoted string, or several `Idempotency-Key` fields. Send one valid key: visible ASCII, at most `max_key_len` characters (a UUID v4 is).
//!
//! ## unreadable-body
//!
//! 400: The duplicate's body failed while it was being read. Retry with the same key and a complete body.
//!
//! ## in-flight
//!
//! 409: The original request with this key is still running (carries `Retry-After`). Retry with the same key after `Retry-After`: the retry gets the original's stored answer.
//!
//! ## body-too-large
//!
//! 413: A duplicate's body is over `max_duplicate_body` [[`defaults::MAX_DUPLICATE_BODY`](crate::defaults::MAX_DUPLICATE_BODY)]. A retry must send the original's body, which was not this large: check the client.
//!
//! ## key-reused
//!
//! 422: The key was used before with another payload, or a run with another payload saved the
//! key's recovery point (a side effect already happened under it). Do not retry with this
//! payload: a new operation needs a new key.
//!
//! ## missing-scope
//!
//! 500: The scope function returned `None` (authentication must run before the layer). A server misconfiguration (see [`IdempotencyLayer::scope`](crate::IdempotencyLayer::scope)); the handler did not run.
//!
//! ## handler-panicked
//!
//! 500: The handler panicked (the key is released). Nothing was stored: a retry with the same key runs again.
//!
//! ## response-failed
//!
//! 500: The handler's response body failed (the key is released). Nothing was stored: a retry with the same key runs again.
//!
//! ## progress-unsaved
//!
//! 500: The handler failed (a panic, an error of the inner service) after one of its recovery
//! points could not be saved (see [`RecoveryPoints`](crate::RecoveryPoints)): part of its work,
//! a side effect, may be recorded nowhere else, so the key is kept with this answer instead of
//! being released, and no retry runs the work again. An operator settles the case and deletes
//! the key ([`admin`](crate::admin)).
//!
//! ## answer-not-stored
//!
//! gRPC only, as `FAILED_PRECONDITION` (9) in a trailers-only answer (409 is what the kind
//! reports as its HTTP status; an HTTP duplicate of a body too large to keep gets the stored
//! status and headers with `idempotent-body-omitted: true` instead). The original call with
//! this key succeeded, but its answer was larger than `max_stored_body`
//! [[`defaults::MAX_STORED_BODY`](crate::defaults::MAX_STORED_BODY)]: the original client got
//! all of it, and only its head was kept. A gRPC answer cannot be replayed without its message,
//! and the call is never run a second time: retrying with the same key cannot help (unlike
//! `ABORTED`, which tells a client to retry). The client that lost the answer must fetch the
//! outcome another way, or raise the server's `max_stored_body`.
//!
//! ## unreadable-record
//!
//! 500: The stored record is damaged (cut, changed, malformed): the key was used, so the handler is not run, under any store-error policy. Retrying does not help until an operator deletes the record ([`admin`](crate::admin)) or its TTL passes.
//!
//! ## unknown-record-version
//!
//! 503: The stored record was written by a newer release (a rolling upgrade): the handler is not run; retry later (carries `Retry-After`). Retry with the same key after `Retry-After`: an up-to-date instance answers it.
//!
//! ## store-unavailable
//!
//! 503: The store failed or was slower than the store timeout (carries `Retry-After`). Retry with the same key after `Retry-After`; the handler did not run.
//!
//! ## shutting-down
//!
//! 503: The server is draining ([`DrainHandle`](crate::DrainHandle)); retry elsewhere (carries `Retry-After`). Retry with the same key: another instance takes it.
//!
//! ## overloaded
//!
//! 503: Too many requests run on after their clients left (`max_detached`) (carries `Retry-After`). Retry with the same key after `Retry-After`.
//!
//! [`ProblemKind`] names each one, with its type URI, for clients and tests.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use super::key::KeyError;
use super::response_body::ResponseBody;

macro_rules! problem_kinds {
    ($($kind:ident => $status:ident, $grpc:literal, $slug:literal, $title:literal, $detail:literal;)*) => {
        /// Each kind of answer the layer gives on its own, with its problem type URI: match on
        /// it instead of comparing strings.
        ///
        /// ```
        /// use tower_idempotency::problem::ProblemKind;
        ///
        /// let kind = ProblemKind::from_type_uri(ProblemKind::KeyReused.type_uri());
        /// assert_eq!(kind, Some(ProblemKind::KeyReused));
        /// assert_eq!(ProblemKind::KeyReused.status(), 422);
        /// ```
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ProblemKind {
            $(
                #[doc = concat!("`#", $slug, "`: ", $detail)]
                $kind,
            )*
        }

        impl ProblemKind {
            /// Every kind.
            pub const ALL: &'static [ProblemKind] = &[$(ProblemKind::$kind),*];

            /// The problem type URI (the `type` member of the problem document).
            pub const fn type_uri(self) -> &'static str {
                match self {
                    $(ProblemKind::$kind => concat!(
                        "https://docs.rs/tower-idempotency/latest/tower_idempotency/problem/index.html#",
                        $slug
                    ),)*
                }
            }

            /// The fragment of the type URI (`key-reused`, ...).
            pub const fn slug(self) -> &'static str {
                match self {
                    $(ProblemKind::$kind => $slug,)*
                }
            }

            /// The HTTP status the layer answers with.
            pub const fn status(self) -> StatusCode {
                match self {
                    $(ProblemKind::$kind => StatusCode::$status,)*
                }
            }

            /// The gRPC status code a gRPC call gets instead (3 `INVALID_ARGUMENT`, 9
            /// `FAILED_PRECONDITION`, 10 `ABORTED`, 13 `INTERNAL`, 14 `UNAVAILABLE`).
            pub const fn grpc_code(self) -> u8 {
                match self {
                    $(ProblemKind::$kind => $grpc,)*
                }
            }

            /// The problem document's `title`.
            pub const fn title(self) -> &'static str {
                match self {
                    $(ProblemKind::$kind => $title,)*
                }
            }

            const fn detail(self) -> &'static str {
                match self {
                    $(ProblemKind::$kind => $detail,)*
                }
            }

            /// The kind a problem document's `type` names, if it is one of the layer's.
            pub fn from_type_uri(uri: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|kind| kind.type_uri() == uri)
            }
        }
    };
}

problem_kinds! {
    MissingKey => BAD_REQUEST, 3, "missing-key", "Idempotency key required",
        "This endpoint requires an Idempotency-Key header.";
    InvalidKey => BAD_REQUEST, 3, "invalid-key", "Invalid idempotency key",
        "The Idempotency-Key header is not a valid key.";
    UnreadableBody => BAD_REQUEST, 3, "unreadable-body", "Request body could not be read",
        "The request body failed before it could be compared with the original request.";
    InFlight => CONFLICT, 10, "in-flight", "Request in progress",
        "A request with this idempotency key is still being processed; retry later with the same key.";
    BodyTooLarge => PAYLOAD_TOO_LARGE, 3, "body-too-large", "Request body too large",
        "The request body is larger than a retry may send to be compared with the original request.";
    KeyReused => UNPROCESSABLE_ENTITY, 3, "key-reused", "Idempotency key reused",
        "This idempotency key was already used with a different request payload.";
    MissingScope => INTERNAL_SERVER_ERROR, 13, "missing-scope", "Idempotency scope missing",
        "The server could not tell whose request this is, so it did not process it. (Server side: the idempotency scope function returned None; authentication must run before the idempotency layer.)";
    HandlerPanicked => INTERNAL_SERVER_ERROR, 13, "handler-panicked", "Internal server error",
        "The request failed; it was not recorded and may be retried with the same key.";
    ResponseFailed => INTERNAL_SERVER_ERROR, 13, "response-failed", "Internal server error",
        "The response could not be produced; it was not recorded and may be retried with the same key.";
    ProgressUnsaved => INTERNAL_SERVER_ERROR, 13, "progress-unsaved", "Outcome not recorded",
        "The request failed after part of its work was done, and that progress could not be recorded; the key is kept so that the work is not repeated. Contact the service before retrying with a new key.";
    AnswerNotStored => CONFLICT, 9, "answer-not-stored", "Answer too large to replay",
        "This call was already run and succeeded, but its answer was larger than the server stores, so it cannot be sent again; it will not be run again with this key.";
    UnreadableRecord => INTERNAL_SERVER_ERROR, 13, "unreadable-record", "Stored response unreadable",
        "The response stored for this idempotency key cannot be replayed.";
    UnknownRecordVersion => SERVICE_UNAVAILABLE, 14, "unknown-record-version", "Stored response from a newer version",
        "The response stored for this idempotency key was written by a newer version of this service; retry later with the same key (an up-to-date instance will answer it).";
    StoreUnavailable => SERVICE_UNAVAILABLE, 14, "store-unavailable", "Idempotency store unavailable",
        "The request was not processed because its idempotency key could not be checked; retry later with the same key.";
    ShuttingDown => SERVICE_UNAVAILABLE, 14, "shutting-down", "Server shutting down",
        "This server is shutting down and did not process the request; retry with the same key (another instance will take it).";
    Overloaded => SERVICE_UNAVAILABLE, 14, "overloaded", "Server overloaded",
        "Too many requests are still running on this server; retry later with the same key.";
}

/// One answer the layer gives on its own: a kind, and what the kind needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Problem {
    /// Any kind without more to say.
    Plain(ProblemKind),
    InvalidKey(KeyError),
    /// Kinds that carry `Retry-After`.
    RetryAfter(ProblemKind, Duration),
}

impl Problem {
    /// The answer: a problem document, or for a gRPC call a trailers-only gRPC error.
    pub(crate) fn respond<B>(self, grpc: bool) -> Response<ResponseBody<B>> {
        if grpc {
            self.into_grpc_response()
        } else {
            self.into_response()
        }
    }

    fn parts(&self) -> (ProblemKind, Cow<'static, str>, Option<Duration>) {
        match self {
            Problem::Plain(kind) => (*kind, Cow::Borrowed(kind.detail()), None),
            Problem::InvalidKey(error) => (ProblemKind::InvalidKey, sentence(error), None),
            Problem::RetryAfter(kind, after) => (*kind, Cow::Borrowed(kind.detail()), Some(*after)),
        }
    }

    /// A trailers-only gRPC answer: HTTP 200, `grpc-status` and `grpc-message` in the headers,
    /// no body.
    fn into_grpc_response<B>(self) -> Response<ResponseBody<B>> {
        let (kind, detail, _) = self.parts();
        let mut response = Response::new(ResponseBody::full(Bytes::new()));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(
            "grpc-status",
            HeaderValue::from(u16::from(kind.grpc_code())),
        );
        let message = percent_encode(&format!("{}: {detail}", kind.slug()));
        if let Ok(value) = HeaderValue::try_from(message) {
            headers.insert("grpc-message", value);
        }
        response
    }

    /// The HTTP answer: a problem document.
    fn into_response<B>(self) -> Response<ResponseBody<B>> {
        let (kind, detail, retry_after) = self.parts();
        let status = kind.status();
        let body = serde_json::json!({
            "type": kind.type_uri(),
            "title": kind.title(),
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
        if let Some(after) = retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

/// gRPC's percent-encoding of `grpc-message`: bytes outside visible ASCII and space, and `%`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A key error as a sentence: capitalised, with a full stop.
fn sentence(error: &KeyError) -> Cow<'static, str> {
    let text = error.to_string();
    let mut chars = text.chars();
    let first = chars.next().map(|c| c.to_ascii_uppercase());
    Cow::Owned(first.into_iter().chain(chars).chain(['.']).collect())
}
