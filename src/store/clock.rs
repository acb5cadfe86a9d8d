//! The clock arithmetic the stores and the protocol share.

use std::time::Duration;

use tokio::time::Instant;

/// The longest lease, TTL, store timeout or wait accepted: past this, a value is a mistake
/// (and instants past it risk overflowing the clock).
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// `now + duration`, saturating far in the future instead of overflowing the clock.
pub(crate) fn later(now: Instant, duration: Duration) -> Instant {
    now.checked_add(duration.min(MAX_DURATION))
        .unwrap_or(now + Duration::from_secs(86_400))
}
