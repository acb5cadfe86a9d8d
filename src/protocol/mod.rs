//! The protocol every adapter speaks, apart from any transport: claim a key, run the work
//! while renewing the lease, then complete the claim with a record or release it.
//!
//! The HTTP layer and the message-consumer adapter (and any adapter to come) drive a
//! [`Store`] only through [`begin`] and the [`ClaimGuard`] it hands out, so they share one set
//! of rules:
//!
//! | event | what the guard does |
//! |---|---|
//! | the work runs | the lease is renewed every third of it, beside the work |
//! | the work panics | the panic is caught ([`ClaimGuard::run`] returns [`Panicked`]); the adapter releases the key and answers in its own terms (HTTP: 500 problem; consumer: `ConsumerError::Panicked`) |
//! | the caller's future is dropped after the claim (client gone, timeout) | the rest of the work is finished on the runtime ([`FinishOnDrop`]), so the outcome is stored and a retry replays it |
//! | the guard is dropped without `complete` or `release` (a runtime shutting down, a bug) | the claim is released in the background, so the key is never blocked for a whole lease |
//! | a store call is slower than the store timeout | the call fails with [`Failure::Timeout`] |
//! | the process drains ([`DrainHandle`]) | new work is refused before its claim; held claims end on their own, or are released at the deadline |

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::clock::later;
pub(crate) use crate::store::clock::MAX_DURATION;
use crate::store::seal;
use crate::store::{ClaimOutcome, OwnerToken, Record, Store, StoreError};

mod detach;
mod drain;
mod guard;
mod outcome;
mod recovery;
mod settings;

pub(crate) use detach::FinishOnDrop;
pub use drain::{DrainHandle, DrainReport};
pub(crate) use drain::{Limits, Refusal, Ticket, Tracker};
pub(crate) use guard::{catch_unwind, CatchUnwind, ClaimGuard, Panicked};
pub(crate) use outcome::OutcomeHook;
pub use outcome::{Outcome, ReleaseReason};
pub(crate) use recovery::{BodyFingerprint, RequestFingerprint};
pub use recovery::{RecoveryError, RecoveryPoints};
pub use settings::Settings;

/// What a duplicate gets while the original still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnConflict {
    /// Answer at once that the original still runs (the default): 409 with `Retry-After`
    /// over HTTP, `Delivery::InProgress` for a consumer.
    Reject,
    /// Wait up to this long for the original to finish and replay its outcome; answer as
    /// `Reject` after. Should the original fail instead (its key released), the waiting
    /// duplicate is a retry like any other: it claims the key and runs the handler itself.
    Wait(Duration),
    /// As [`Wait`](Self::Wait) (up to this long), and a duplicate of an original whose
    /// response streams follows it live: it gets every chunk sent so far, then each as the
    /// original sends it. Should the original fail mid-stream, a joined duplicate fails with
    /// it (its connection is closed with an error, never a clean end) and the key is
    /// released; a duplicate that found nothing streaming waits as with `Wait`. It joins a
    /// stream of the same service in memory, and one of another instance through a store that
    /// keeps live streams (Redis, PostgreSQL, SQLite: `Store::append_stream`), watching for
    /// it up to the bound when it has not started yet (on the memory store, one that arrives
    /// before the original answered its head waits: see `docs/streaming.md`). A consumer
    /// treats it as `Wait`.
    Join(Duration),
}

/// Timings of the protocol.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timings {
    /// How long a claim lasts without renewal.
    pub(crate) lease: Duration,
    /// How long a completed record is kept.
    pub(crate) ttl: Duration,
    /// The longest any store call may take.
    pub(crate) store_timeout: Duration,
    /// How long a duplicate waits for the original; `None` answers at once.
    pub(crate) wait: Option<Duration>,
    /// Whether a waiting duplicate follows a streaming original live ([`OnConflict::Join`]).
    pub(crate) join: bool,
}

impl Default for Timings {
    /// The [`defaults`](crate::defaults); no waiting.
    fn default() -> Self {
        Self {
            lease: crate::defaults::LEASE,
            ttl: crate::defaults::TTL,
            store_timeout: crate::defaults::STORE_TIMEOUT,
            wait: None,
            join: false,
        }
    }
}

/// The shortest lease accepted: renewal runs every third of it.
pub(crate) const MIN_LEASE: Duration = Duration::from_millis(30);

/// Refuses a duration outside `[min, MAX_DURATION]` with a message that names the knob.
pub(crate) fn checked(knob: &str, value: Duration, min: Duration) -> Duration {
    assert!(
        value >= min && value <= MAX_DURATION,
        "tower-idempotency: {knob} must be between {min:?} and {} days, got {value:?}",
        MAX_DURATION.as_secs() / 86_400
    );
    value
}

impl Timings {
    pub(crate) fn set_lease(&mut self, lease: Duration) {
        self.lease = checked("the lease", lease, MIN_LEASE);
    }

    pub(crate) fn set_ttl(&mut self, ttl: Duration) {
        self.ttl = checked("the TTL", ttl, Duration::from_millis(1));
    }

    pub(crate) fn set_store_timeout(&mut self, timeout: Duration) {
        self.store_timeout = checked("the store timeout", timeout, Duration::from_millis(1));
    }

    pub(crate) fn set_on_conflict(&mut self, on_conflict: OnConflict) {
        self.wait = match on_conflict {
            OnConflict::Reject => None,
            OnConflict::Wait(bound) | OnConflict::Join(bound) => {
                Some(checked("the wait bound", bound, Duration::ZERO))
            }
        };
        self.join = matches!(on_conflict, OnConflict::Join(_));
    }
}

/// Why the protocol could not go on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store call timed out")]
    Timeout,
}

impl Failure {
    /// The record exists but cannot be read (damaged, or from a newer release): the key was
    /// used, so the work must not run, whatever the adapter's store-error policy.
    pub(crate) fn unreadable(&self) -> Option<seal::Unreadable> {
        match self {
            Failure::Store(error) => seal::unreadable(error),
            Failure::Timeout => None,
        }
    }
}

/// What [`begin`] found.
#[derive(Debug)]
pub(crate) enum Begin<St: Store> {
    /// The caller owns the key: run the work under this guard.
    Claimed(ClaimGuard<St>),
    /// The original still runs (after waiting, when waiting is on).
    InFlight {
        waited: bool,
        /// How long its lease still runs, when the store knows.
        lease_remaining: Option<Duration>,
    },
    /// The original finished.
    Completed { record: Record, waited: bool },
    /// The original runs, and joining is on ([`Timings::join`]): the caller looks for its live
    /// stream, and else calls [`begin`] again with joining off to wait (the ticket and the key
    /// are handed back for it). Answered at the first answer in flight only.
    MayJoin { ticket: Ticket, key: String },
}

/// Whether a duplicate carries the payload its record was made from (a side without a
/// fingerprint matches anything). A mismatch is logged, the same way for every adapter.
pub(crate) fn same_payload(stored: Option<u128>, now: Option<u128>) -> bool {
    let same = match (stored, now) {
        (Some(stored), Some(now)) => stored == now,
        _ => true,
    };
    if !same {
        tracing::info!(outcome = "mismatch", "key reused with a different payload");
    }
    same
}

/// The longest store key, in bytes: a longer composite key keeps a readable prefix and ends
/// with a digest of the whole, so no scope, path or key length can break a backend (a
/// PostgreSQL index entry holds at most about 2.7 kB).
pub(crate) const MAX_STORE_KEY: usize = 256;
/// How much of a long key stays readable before its digest.
const READABLE_PREFIX: usize = 160;

/// The store key of a request: `tag`, then each field length-prefixed (so two different tuples
/// never make the same string), then the caller's key; past [`MAX_STORE_KEY`] bytes,
/// `~sha256:`, the SHA-256 of the whole in hex, `|`, and a readable prefix. No composite key
/// starts with `~` (they start with a field length or a tag), so a digested key never equals
/// a short one.
pub(crate) fn composite_key(tag: &str, fields: &[&str], key: &str) -> String {
    let len = tag.len() + fields.iter().map(|f| f.len() + 8).sum::<usize>() + key.len();
    // Every piece is a `&str` (copied by `push_str`, which checks nothing) or an ASCII `char`
    // (one byte): no UTF-8 check of the whole, as building it as bytes would need.
    let mut out = String::with_capacity(len);
    out.push_str(tag);
    for field in fields {
        push_decimal(&mut out, field.len());
        out.push(':');
        out.push_str(field);
        out.push('|');
    }
    out.push_str(key);
    if out.len() > MAX_STORE_KEY {
        return digested(&out);
    }
    out
}

fn digested(long: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut cut = READABLE_PREFIX;
    while !long.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = Sha256::digest(long.as_bytes());
    let mut out = String::with_capacity(8 + 64 + 1 + cut);
    out.push_str("~sha256:");
    for byte in digest {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 15)]));
    }
    out.push('|');
    out.push_str(&long[..cut]);
    out
}

fn push_decimal(out: &mut String, mut n: usize) {
    if n < 10 {
        out.push(char::from(b'0' + n as u8));
        return;
    }
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
}

/// Takes the instance of `inner` that `poll_ready` drove to readiness and leaves a clone in
/// its place (see tower's docs: "Be careful when cloning inner services").
pub(crate) fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

/// Polls `future` once: its output if it is ready at once.
async fn ready_now<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match Pin::new(&mut *future).poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// Runs one store call, bounded by the store timeout: a hung store never hangs the caller.
/// A call that completes at once (the memory store) never registers a timer.
pub(crate) async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, Failure> {
    let mut call = std::pin::pin!(call);
    if let Some(result) = ready_now(&mut call).await {
        return Ok(result?);
    }
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Failure::Timeout),
    }
}

/// A claim call timed out, but the store may still write it (a paused or slow server runs
/// the queued call later): release that claim, in the background, so that a late write cannot
/// lock the key for a whole lease. Retried with backoff until it succeeds or a lease passes.
fn release_if_it_lands<St: Store + Clone>(
    store: &St,
    key: &str,
    token: OwnerToken,
    timings: &Timings,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (store, key, timings) = (store.clone(), key.to_owned(), *timings);
    runtime.spawn(async move {
        let give_up = later(Instant::now(), timings.lease);
        let mut attempt = 0u32;
        while Instant::now() < give_up {
            match bounded(timings.store_timeout, store.release(&key, &token)).await {
                Ok(()) => {
                    tracing::info!(
                        outcome = "released",
                        reason = "claim_timed_out",
                        "a claim that timed out landed late; released it"
                    );
                    return;
                }
                // Not there (yet), or the store is still slow: try again.
                Err(_) => {
                    tokio::time::sleep(guard::retry_backoff(attempt)).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    });
}

/// The first claim's token, and what the store answered to it at once ([`Store::claim_now`]):
/// [`begin`] starts from that outcome instead of calling the store again.
pub(crate) enum FirstClaim {
    /// The store did not answer at once: the first call to `claim_as` uses this token.
    Unanswered(OwnerToken),
    /// The key was claimed, for this token (a fresh key).
    Claimed(OwnerToken),
    /// Any other answer (no timeout to clean up after: the store answered at once). Boxed: rare
    /// on this path (a replay is answered before it), and every keyed request's state would
    /// carry it.
    Other(Box<Result<ClaimOutcome, StoreError>>),
}

impl FirstClaim {
    /// What the store answered to a claim made with `token`.
    pub(crate) fn new(
        token: OwnerToken,
        claimed: Option<Result<ClaimOutcome, StoreError>>,
    ) -> Self {
        match claimed {
            None => FirstClaim::Unanswered(token),
            Some(Ok(ClaimOutcome::Claimed(owner))) => FirstClaim::Claimed(owner),
            Some(other) => FirstClaim::Other(Box::new(other)),
        }
    }
}

/// Claims `key` for the request admitted with `ticket`; while the key is in flight and waiting
/// is on, waits for it (woken by the store, never polling in a tight loop) until the wait
/// bound. `first` is the outcome of a claim already made at once, if any (then the first
/// round makes no store call).
///
/// An `async` block, not an `async fn`, for the reason given at the HTTP adapter's `run`: its
/// arguments would be kept twice in the state of every keyed request.
#[allow(clippy::manual_async_fn)]
pub(crate) fn begin<'a, St: Store + Clone>(
    store: &'a St,
    key: String,
    timings: &'a Timings,
    mut ticket: Ticket,
    mut first: Option<FirstClaim>,
) -> impl Future<Output = Result<Begin<St>, Failure>> + 'a {
    async move {
        let deadline = timings.wait.map(|wait| later(Instant::now(), wait));
        let mut attempt = 0u32;
        loop {
            let waited = attempt > 0;
            // The first round may have been claimed at once already; every other one calls
            // the store.
            let round = first
                .take()
                .unwrap_or_else(|| FirstClaim::Unanswered(OwnerToken::random()));
            let claimed = match round {
                FirstClaim::Claimed(token) => Ok(ClaimOutcome::Claimed(token)),
                FirstClaim::Other(claimed) => *claimed,
                FirstClaim::Unanswered(token) => {
                    let claim = store.claim_as(&key, &token, timings.lease);
                    match bounded(timings.store_timeout, claim).await {
                        Ok(outcome) => Ok(outcome),
                        Err(Failure::Store(error)) => Err(error),
                        Err(Failure::Timeout) => {
                            release_if_it_lands(store, &key, token, timings);
                            return Err(Failure::Timeout);
                        }
                    }
                }
            };
            let outcome = match claimed {
                Ok(outcome) => outcome,
                Err(error) => {
                    if let Some(unreadable) = seal::unreadable(&error) {
                        seal::report(seal::identity(key.as_bytes()), unreadable, &error);
                    }
                    return Err(Failure::Store(error));
                }
            };
            match outcome {
                ClaimOutcome::Claimed(token) => {
                    let key: std::sync::Arc<str> = key.into();
                    ticket.hold(&key, token);
                    return Ok(Begin::Claimed(ClaimGuard::new(
                        store.clone(),
                        key,
                        token,
                        *timings,
                        ticket,
                    )));
                }
                ClaimOutcome::Completed(record) => return Ok(Begin::Completed { record, waited }),
                ClaimOutcome::InFlight { .. } if timings.join && !waited => {
                    return Ok(Begin::MayJoin { ticket, key });
                }
                ClaimOutcome::InFlight { lease_remaining } => match deadline {
                    Some(deadline) if Instant::now() < deadline => {
                        // Boxed: only a waiting duplicate needs this state, and every claim's
                        // future would otherwise carry (allocate, move) it.
                        let _ =
                            Box::pin(tokio::time::timeout_at(deadline, store.wait(&key, attempt)))
                                .await;
                        attempt = attempt.saturating_add(1);
                    }
                    _ => {
                        return Ok(Begin::InFlight {
                            waited,
                            lease_remaining,
                        })
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::guard::Completion;
    use super::*;
    use crate::store::MemoryStore;

    fn timings() -> Timings {
        Timings {
            lease: Duration::from_secs(3),
            ttl: Duration::from_secs(60),
            store_timeout: Duration::from_secs(1),
            wait: None,
            join: false,
        }
    }

    fn ticket() -> Ticket {
        std::sync::Arc::new(Tracker::default())
            .enter(&Limits::default())
            .unwrap()
    }

    async fn claim(store: &MemoryStore, t: &Timings) -> ClaimGuard<MemoryStore> {
        match begin(store, "k".to_owned(), t, ticket(), None)
            .await
            .unwrap()
        {
            Begin::Claimed(guard) => guard,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    async fn in_flight(store: &MemoryStore, t: &Timings) -> bool {
        matches!(
            begin(store, "k".to_owned(), t, ticket(), None)
                .await
                .unwrap(),
            Begin::InFlight { .. }
        )
    }

    #[tokio::test(start_paused = true)]
    async fn run_renews_the_lease_for_work_longer_than_the_lease() {
        let store = MemoryStore::new();
        let t = timings();
        let guard = claim(&store, &t).await;
        // Ten leases long: without renewal the claim would lapse after the first.
        guard.run(tokio::time::sleep(t.lease * 10)).await.unwrap();
        assert!(in_flight(&store, &t).await);
        assert_eq!(
            guard.complete(Record::new(None, "done")).await,
            Completion::Stored
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_renewal_the_lease_lapses_and_is_taken_over() {
        let store = MemoryStore::new();
        let t = timings();
        let old = claim(&store, &t).await;
        tokio::time::sleep(t.lease + Duration::from_millis(1)).await;
        let new = claim(&store, &t).await;
        assert_ne!(old.token(), new.token());
        assert!(matches!(
            old.complete(Record::new(None, "late")).await,
            Completion::Failed
        ));
        new.release().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_in_the_work_is_caught_with_its_message() {
        let store = MemoryStore::new();
        let t = timings();
        let guard = claim(&store, &t).await;
        let panicked = guard
            .run(async { panic!("boom") })
            .await
            .expect_err("the panic is caught");
        assert_eq!(panicked.message(), "boom");
        assert!(
            in_flight(&store, &t).await,
            "the adapter decides; still held"
        );
        guard.release().await;
        claim(&store, &t).await.release().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_guard_releases_its_claim_in_the_background() {
        let store = MemoryStore::new();
        let t = timings();
        drop(claim(&store, &t).await);
        tokio::task::yield_now().await;
        // Free at once, not after the lease.
        let guard = claim(&store, &t).await;
        guard.release().await;
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_work_finishes_in_the_background_and_stores_its_outcome() {
        let store = MemoryStore::new();
        let t = timings();
        let tracker = std::sync::Arc::new(Tracker::default());
        let work = FinishOnDrop::new(
            Box::pin({
                let store = store.clone();
                async move {
                    let guard = claim(&store, &t).await;
                    guard.run(tokio::time::sleep(t.lease * 2)).await.unwrap();
                    assert_eq!(
                        guard.complete(Record::new(None, "done")).await,
                        Completion::Stored
                    );
                }
            }),
            tracker.clone(),
            100,
        );
        // Poll it once (the claim is taken), then walk away.
        let mut work = work;
        assert!(futures_poll_once(&mut work).await.is_none());
        drop(work);
        assert!(in_flight(&store, &t).await, "still running, detached");
        let limits = Limits {
            max_detached: 1,
            ..Limits::default()
        };
        assert_eq!(
            tracker.enter(&limits).err(),
            Some(Refusal::Overloaded),
            "detached work counts against the limit"
        );
        tokio::time::sleep(t.lease * 3).await;
        match begin(&store, "k".to_owned(), &t, ticket(), None)
            .await
            .unwrap()
        {
            Begin::Completed { record, .. } => assert_eq!(record.payload(), "done"),
            other => panic!("{other:?}"),
        }
        assert!(
            tracker.enter(&limits).is_ok(),
            "finished work no longer counts"
        );
    }

    async fn futures_poll_once<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
        ready_now(future).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_duplicate_gets_the_outcome_when_the_original_completes() {
        let store = MemoryStore::new();
        let mut t = timings();
        let guard = claim(&store, &t).await;
        t.wait = Some(Duration::from_secs(30));
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { begin(&store, "k".to_owned(), &t, ticket(), None).await }
        });
        // Within the 3 s lease: the waiter is still waiting on the original.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!waiter.is_finished());
        assert_eq!(
            guard.complete(Record::new(None, "done")).await,
            Completion::Stored
        );
        match waiter.await.unwrap().unwrap() {
            Begin::Completed { record, waited } => {
                assert!(waited);
                assert_eq!(record.payload(), "done");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded() {
        let store = MemoryStore::new();
        let mut t = timings();
        t.lease = Duration::from_secs(600);
        let _guard = claim(&store, &t).await;
        t.wait = Some(Duration::from_secs(2));
        let started = Instant::now();
        assert!(matches!(
            begin(&store, "k".to_owned(), &t, ticket(), None)
                .await
                .unwrap(),
            Begin::InFlight { waited: true, .. }
        ));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
    }

    #[test]
    fn composite_keys_of_different_tuples_differ() {
        assert_ne!(
            composite_key("", &["a|1:b", "c"], "k"),
            composite_key("", &["a", "b|c"], "k")
        );
        assert_eq!(composite_key("t|", &["ab", ""], "k"), "t|2:ab|0:|k");
        // Lengths of one, two and three digits.
        let (nine, twelve, hundred) = ("n".repeat(9), "t".repeat(12), "h".repeat(100));
        assert_eq!(
            composite_key("", &[&nine, &twelve, &hundred], "k"),
            format!("9:{nine}|12:{twelve}|100:{hundred}|k")
        );
    }

    #[test]
    fn long_composite_keys_keep_a_prefix_and_a_digest_of_the_whole() {
        let scope = "é".repeat(5000);
        let a = composite_key("", &[&scope, "POST", "/payments"], "k1");
        let b = composite_key("", &[&scope, "POST", "/payments"], "k2");
        assert!(a.len() <= MAX_STORE_KEY, "{}", a.len());
        assert_ne!(a, b, "the digest covers the whole key");
        assert!(a.starts_with("~sha256:") && a.contains("|10000:éé"), "{a}");
        let short = composite_key("", &["acme", "POST", "/payments"], "k1");
        assert_eq!(
            short, "4:acme|4:POST|9:/payments|k1",
            "short keys stay as they are"
        );
    }
}
