//! The default of every knob, defined once: the setters' docs and the README's configuration
//! table refer to these constants.
//!
//! ```
//! use tower_idempotency::{defaults, Settings};
//!
//! // Twice the default lease, for handlers that may pause longer than a minute.
//! let settings = Settings::default().lease(defaults::LEASE * 2);
//! # let _ = settings;
//! ```

use std::time::Duration;

/// How long a claim lasts without renewal: 60 seconds ([`Settings::lease`](crate::Settings::lease)).
pub const LEASE: Duration = Duration::from_secs(60);

/// How long a completed outcome is kept for replay: 24 hours
/// ([`Settings::ttl`](crate::Settings::ttl)).
pub const TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The longest any store call may take: 5 seconds
/// ([`Settings::store_timeout`](crate::Settings::store_timeout)).
pub const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many requests or deliveries may run on after their callers left: 1,024
/// ([`Settings::max_detached`](crate::Settings::max_detached)).
pub const MAX_DETACHED: usize = 1024;

/// How many request-body bytes detached requests may have declared together: 256 MiB
/// ([`Settings::max_detached_bytes`](crate::Settings::max_detached_bytes)).
pub const MAX_DETACHED_BYTES: u64 = 256 * 1024 * 1024;

/// How many bytes of outcomes may wait for a store that failed at their completion: 64 MiB
/// ([`Settings::max_pending_completions`](crate::Settings::max_pending_completions)).
pub const MAX_PENDING_COMPLETIONS: u64 = 64 * 1024 * 1024;

/// The largest recovery point a handler may save: 64 KiB
/// ([`Settings::max_recovery_point`](crate::Settings::max_recovery_point)).
pub const MAX_RECOVERY_POINT: usize = 64 * 1024;

/// The longest idempotency key accepted, in characters: 255
/// ([`IdempotencyLayer::max_key_len`](crate::IdempotencyLayer::max_key_len)).
pub const MAX_KEY_LEN: usize = 255;

/// The largest body a duplicate may send to be compared with the original: 16 MiB
/// ([`IdempotencyLayer::max_duplicate_body`](crate::IdempotencyLayer::max_duplicate_body)).
pub const MAX_DUPLICATE_BODY: u64 = 16 * 1024 * 1024;

/// The largest response body stored: 8 MiB
/// ([`IdempotencyLayer::max_stored_body`](crate::IdempotencyLayer::max_stored_body)). Room for
/// a gRPC answer at tonic's default 4 MiB message limit, and a generated event stream of some
/// 100,000 events.
pub const MAX_STORED_BODY: usize = 8 * 1024 * 1024;

/// The `Retry-After` of the layer's 409 and 503 answers: 1 second
/// ([`IdempotencyLayer::retry_after`](crate::IdempotencyLayer::retry_after)).
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
