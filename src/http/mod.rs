//! The HTTP adapter: a tower layer over the transport-free [`protocol`](crate::protocol).
//!
//! | file | concern |
//! |---|---|
//! | `config.rs` | the adapter's own settings (header, scope, what is stored) and their defaults |
//! | `layer.rs` | [`IdempotencyLayer`]: the adapter's own knobs over the shared [`Settings`](crate::Settings) |
//! | `service.rs` | [`Idempotency`]: the request lifecycle, step by step |
//! | `future.rs` | [`ResponseFuture`]: passthrough, immediate answers, guarded work that outlives its client |
//! | `key.rs` | the `Idempotency-Key` header: parsing and validation |
//! | `fingerprint.rs` | what a request's fingerprint covers, and hashing it |
//! | `request_body.rs` | [`RequestBody`]: the body the handler reads, hashed as it streams |
//! | `capture.rs` | which answers are stored, reading them up to the limit, building the record |
//! | `record.rs` | the versioned binary encoding of a stored response |
//! | `live.rs` | a keyed answer streamed while it is stored, and duplicates joining it |
//! | `replay.rs` | answering a duplicate: compare, then replay or refuse |
//! | `response_body.rs` | [`ResponseBody`]: the handler's body, a buffered original, or a replay |
//! | `problem.rs` | the RFC 9457 answers the layer gives on its own |

pub mod bench;
mod capture;
mod config;
pub mod fingerprint;
mod future;
mod key;
mod layer;
mod live;
pub mod problem;
mod record;
mod replay;
mod request_body;
mod response_body;
mod service;
mod sse;

pub use capture::NoStore;
pub use config::{GrpcMode, OnStoreError};
pub use fingerprint::{Fingerprint, FingerprintHasher};
pub use future::ResponseFuture;
pub use key::{store_key as http_key, IdempotencyKey, KeyError};
pub use layer::IdempotencyLayer;
pub use replay::{BODY_OMITTED_HEADER, REPLAYED_HEADER};
pub use request_body::RequestBody;
pub use response_body::ResponseBody;
pub use service::Idempotency;

/// The status of the response a record holds, if it decodes as one.
pub(crate) fn stored_status(record: &crate::store::Record) -> Option<http::StatusCode> {
    record::decode_record(record, 0, true)
        .ok()
        .map(|stored| stored.status)
}

/// The record decoder's fuzz entry point: decode; what decodes re-encodes to the same response.
pub(crate) fn fuzz_record(data: &[u8]) {
    if let Ok(stored) = record::decode(&bytes::Bytes::copy_from_slice(data)) {
        let body = (!stored.body_omitted).then(|| stored.body.iter());
        let encoded = record::encode(
            stored.status,
            &stored.headers,
            |_| true,
            &stored.carried,
            body,
            stored.trailers.as_ref(),
        )
        .0;
        let again = record::decode(&encoded).expect("a re-encoded record decodes");
        // The same chunks too (a chunked record's boundaries survive the round trip).
        assert_eq!(again, stored);
    }
}
