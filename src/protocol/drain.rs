//! Graceful shutdown: [`DrainHandle`] stops new keyed work, waits for the claims this process
//! holds to end, and hands back the ones still held at the deadline.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{bounded, Failure, Outcome};
use crate::store::{OwnerToken, Store, StoreError};

/// How much work may run on after its caller left, before new keyed work is refused.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_detached: usize,
    pub(crate) max_detached_bytes: u64,
    /// Bytes of outcomes whose completion is being retried after a store failure.
    pub(crate) max_pending_bytes: u64,
    /// The largest recovery point a handler may save.
    pub(crate) max_recovery_point: usize,
}

impl Default for Limits {
    /// The [`defaults`](crate::defaults).
    fn default() -> Self {
        use crate::defaults;
        Self {
            max_detached: defaults::MAX_DETACHED,
            max_detached_bytes: defaults::MAX_DETACHED_BYTES,
            max_pending_bytes: defaults::MAX_PENDING_COMPLETIONS,
            max_recovery_point: defaults::MAX_RECOVERY_POINT,
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The layer is draining.
    Draining,
    /// Detached work is at its limit.
    Overloaded,
}

impl Refusal {
    /// What became of the refused work, logged here for every adapter; each answers it in
    /// its own terms (HTTP 503, a consumer error).
    pub(crate) fn outcome(self) -> Outcome {
        match self {
            Refusal::Draining => {
                tracing::info!(outcome = "shutting_down", "draining: keyed work refused");
                Outcome::ShuttingDown
            }
            Refusal::Overloaded => {
                tracing::warn!(
                    outcome = "overloaded",
                    "too much detached work: keyed work refused"
                );
                Outcome::Overloaded
            }
        }
    }
}

/// What one layer (and every clone of it) has in flight.
#[derive(Default)]
pub(crate) struct Tracker {
    draining: AtomicBool,
    /// Requests or deliveries between their admission and the end of their claim.
    active: AtomicUsize,
    /// Work that runs on after its caller left, and the request bytes it declared.
    detached: AtomicUsize,
    detached_bytes: AtomicU64,
    /// Bytes of completions being retried in the background.
    pending_bytes: AtomicU64,
    /// The claims held now, to release at the deadline.
    claims: Claims,
    next_id: AtomicU64,
    /// Woken when `active` falls to zero.
    idle: Notify,
}

impl Tracker {
    /// Admits one request, unless the process is draining or detached work is at `limits`.
    pub(crate) fn enter(self: &Arc<Self>, limits: &Limits) -> Result<Ticket, Refusal> {
        if self.detached.load(Ordering::Relaxed) >= limits.max_detached
            || self.detached_bytes.load(Ordering::Relaxed) >= limits.max_detached_bytes
        {
            return Err(Refusal::Overloaded);
        }
        self.active.fetch_add(1, Ordering::SeqCst);
        if self.draining.load(Ordering::SeqCst) {
            self.leave();
            return Err(Refusal::Draining);
        }
        Ok(Ticket {
            tracker: self.clone(),
            claim: None,
            max_pending_bytes: limits.max_pending_bytes,
        })
    }

    /// Counts work that runs on after its caller left, until the returned value is dropped.
    pub(crate) fn detach(self: &Arc<Self>, bytes: u64) -> Detached {
        self.detached.fetch_add(1, Ordering::Relaxed);
        self.detached_bytes.fetch_add(bytes, Ordering::Relaxed);
        Detached {
            tracker: self.clone(),
            bytes,
        }
    }

    fn leave(&self) {
        // Only a drain waits for `idle`, and it sets `draining` before it looks at `active`:
        // all SeqCst, so either this sees `draining` and wakes it, or the drain's look comes
        // after this decrement and sees it. Outside a drain nothing is woken: `notify_waiters`
        // takes a lock, every time a process falls idle.
        if self.active.fetch_sub(1, Ordering::SeqCst) == 1 && self.draining.load(Ordering::SeqCst) {
            self.idle.notify_waiters();
        }
    }
}

/// How many locks the claim registry spreads its claims over.
const CLAIM_SHARDS: usize = 16;

type ClaimShard = HashMap<u64, (Arc<str>, OwnerToken), ahash::RandomState>;

/// The claims held now, by the id of the ticket holding each. Every claimed request adds and
/// removes its own: sharded by id (consecutive ids land on different locks), so that requests
/// running at once seldom wait for each other, and hashed with ahash (ids come from a counter
/// in this process; nobody outside chooses them).
#[derive(Default)]
struct Claims {
    shards: [Mutex<ClaimShard>; CLAIM_SHARDS],
}

impl Claims {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, ClaimShard> {
        // A panic while holding a shard cannot leave it half-updated (one map operation).
        self.shards[id as usize % CLAIM_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, id: u64, key: Arc<str>, token: OwnerToken) {
        self.shard(id).insert(id, (key, token));
    }

    fn remove(&self, id: u64) {
        self.shard(id).remove(&id);
    }

    /// Takes every claim held now.
    fn take_all(&self) -> Vec<(Arc<str>, OwnerToken)> {
        (0..CLAIM_SHARDS as u64)
            .flat_map(|id| {
                self.shard(id)
                    .drain()
                    .map(|(_, claim)| claim)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// One piece of detached work, counted until dropped.
pub(crate) struct Detached {
    tracker: Arc<Tracker>,
    bytes: u64,
}

impl Drop for Detached {
    fn drop(&mut self) {
        self.tracker.detached.fetch_sub(1, Ordering::Relaxed);
        self.tracker
            .detached_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// One admitted request: counted until dropped; its claim, once it has one, is on record.
pub(crate) struct Ticket {
    tracker: Arc<Tracker>,
    claim: Option<u64>,
    max_pending_bytes: u64,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("claim", &self.claim)
            .finish()
    }
}

/// Bytes of one pending completion, counted until dropped.
pub(crate) struct PendingBytes {
    tracker: Arc<Tracker>,
    bytes: u64,
}

impl Drop for PendingBytes {
    fn drop(&mut self) {
        self.tracker
            .pending_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A claim's way off the drain's list: a drain past its deadline then leaves the claim to its
/// run instead of releasing it (a run whose side effect is recorded nowhere but in its
/// outcome, which a released key's retry would repeat).
pub(crate) struct KeepOnDrain {
    tracker: Arc<Tracker>,
    id: u64,
}

impl KeepOnDrain {
    /// Takes the claim off the drain's list.
    pub(crate) fn keep(&self) {
        self.tracker.claims.remove(self.id);
    }
}

impl Ticket {
    /// The claim's way off the drain's list, once it holds one.
    pub(crate) fn keep_on_drain(&self) -> Option<KeepOnDrain> {
        self.claim.map(|id| KeepOnDrain {
            tracker: self.tracker.clone(),
            id,
        })
    }

    /// Counts `bytes` of a completion to retry, unless that would pass the layer's bound.
    pub(crate) fn reserve_pending(&self, bytes: u64) -> Option<PendingBytes> {
        let pending = &self.tracker.pending_bytes;
        let before = pending.fetch_add(bytes, Ordering::Relaxed);
        if bytes > 0 && before.saturating_add(bytes) > self.max_pending_bytes {
            pending.fetch_sub(bytes, Ordering::Relaxed);
            return None;
        }
        Some(PendingBytes {
            tracker: self.tracker.clone(),
            bytes,
        })
    }

    /// Records the claim this request now holds.
    pub(crate) fn hold(&mut self, key: &Arc<str>, token: OwnerToken) {
        let id = self.tracker.next_id.fetch_add(1, Ordering::Relaxed);
        self.tracker.claims.insert(id, key.clone(), token);
        self.claim = Some(id);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(id) = self.claim {
            self.tracker.claims.remove(id);
        }
        self.tracker.leave();
    }
}

/// Shuts an [`IdempotencyLayer`](crate::IdempotencyLayer) (or a consumer layer) down without
/// losing work or blocking keys. Get one with [`Settings::drain_handle`](crate::Settings::drain_handle)
/// (`layer.settings().drain_handle()`); it sees every service made by a layer built on those
/// settings or a clone of them, HTTP and consumer alike.
///
/// Once [`start`](Self::start) (or [`drain`](Self::drain)) is called:
///
/// * requests and deliveries that already reached the store run to their end, including work
///   that runs detached because its client went away, and their outcomes are stored as usual;
/// * new keyed requests get 503 with `Retry-After` (problem type `#shutting-down`), so that a
///   load balancer's retry lands on another instance; a consumer's deliveries get
///   `ConsumerError::ShuttingDown` (do not ack them); keyless requests are not affected;
/// * at the deadline, every claim this process still holds is **released**, so that a retry
///   elsewhere runs at once instead of waiting for the lease; [`DrainReport`] says which.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::IdempotencyLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let layer = IdempotencyLayer::new();
/// let drain = layer.settings().drain_handle();
/// // ... serve with `layer`; on SIGTERM stop accepting, then:
/// let report = drain.drain(Duration::from_secs(25)).await;
/// assert!(report.released().is_empty());
/// # }
/// ```
pub struct DrainHandle<St> {
    tracker: Arc<Tracker>,
    store: St,
    store_timeout: Duration,
}

impl<St: Clone> Clone for DrainHandle<St> {
    fn clone(&self) -> Self {
        Self {
            tracker: self.tracker.clone(),
            store: self.store.clone(),
            store_timeout: self.store_timeout,
        }
    }
}

impl<St> fmt::Debug for DrainHandle<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainHandle")
            .field("draining", &self.is_draining())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

/// What a [`DrainHandle::drain`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    released: Vec<String>,
    not_released: Vec<String>,
    waited: Duration,
}

impl DrainReport {
    /// The store keys of the claims released at the deadline: their requests were still
    /// running, and a retry elsewhere runs them again.
    pub fn released(&self) -> &[String] {
        &self.released
    }

    /// Claims still held at the deadline that could not be released (the store failed or was
    /// slower than the store timeout): they block their keys until their leases lapse.
    pub fn not_released(&self) -> &[String] {
        &self.not_released
    }

    /// How long the drain waited for work to finish.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Whether every claim ended on its own before the deadline.
    pub fn is_clean(&self) -> bool {
        self.released.is_empty() && self.not_released.is_empty()
    }
}

impl<St> DrainHandle<St> {
    pub(crate) fn new(tracker: Arc<Tracker>, store: St, store_timeout: Duration) -> Self {
        Self {
            tracker,
            store,
            store_timeout,
        }
    }

    /// Stops admitting keyed requests (they get 503 from now on). Calling it again does
    /// nothing.
    pub fn start(&self) {
        if !self.tracker.draining.swap(true, Ordering::SeqCst) {
            tracing::info!(
                in_flight = self.in_flight(),
                "draining: new keyed requests are refused"
            );
        }
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.tracker.draining.load(Ordering::SeqCst)
    }

    /// Requests or deliveries admitted and not yet finished with their claim.
    pub fn in_flight(&self) -> usize {
        self.tracker.active.load(Ordering::SeqCst)
    }
}

impl<St: Store + Clone> DrainHandle<St> {
    /// Starts draining (see [`start`](Self::start)), waits up to `timeout` for every admitted
    /// request to finish with its claim, then releases the claims still held.
    pub async fn drain(&self, timeout: Duration) -> DrainReport {
        self.start();
        let started = Instant::now();
        let deadline = started.checked_add(timeout);
        loop {
            let idle = self.tracker.idle.notified();
            let mut idle = std::pin::pin!(idle);
            idle.as_mut().enable();
            if self.in_flight() == 0 {
                break;
            }
            let timed_out = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, idle).await.is_err(),
                None => {
                    idle.await;
                    false
                }
            };
            if timed_out {
                break;
            }
        }
        let waited = started.elapsed();
        let held = self.tracker.claims.take_all();
        let mut report = DrainReport {
            waited,
            ..DrainReport::default()
        };
        if held.is_empty() {
            tracing::info!(waited_ms = waited.as_millis() as u64, "drained");
            return report;
        }
        let mut releases = tokio::task::JoinSet::new();
        for (key, token) in held {
            let (store, timeout) = (self.store.clone(), self.store_timeout);
            releases.spawn(async move {
                let result = bounded(timeout, store.release(&key, &token)).await;
                (key, result)
            });
        }
        while let Some(joined) = releases.join_next().await {
            let Ok((key, result)) = joined else { continue };
            match result {
                Ok(()) => report.released.push(key.to_string()),
                // It ended (completed or released) between the deadline and now.
                Err(Failure::Store(StoreError::LeaseLost)) => {}
                Err(error) => {
                    tracing::error!(key = &*key, %error, "drain could not release a claim; it lapses with its lease");
                    report.not_released.push(key.to_string());
                }
            }
        }
        tracing::warn!(
            released = report.released.len(),
            not_released = report.not_released.len(),
            waited_ms = waited.as_millis() as u64,
            "drain deadline passed: claims still held were released so that retries run elsewhere"
        );
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    /// A drain that starts while the last requests leave is woken by the last of them, never
    /// left to wait for its deadline: `leave` skips the wake-up only while no drain has begun.
    /// Real threads race each round: the requests' ends against the drain's start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_racing_the_last_requests_is_woken_by_them() {
        const ROUNDS: usize = 300;
        const REQUESTS: usize = 4;
        for round in 0..ROUNDS {
            let tracker = Arc::new(Tracker::default());
            let handle =
                DrainHandle::new(tracker.clone(), MemoryStore::new(), Duration::from_secs(1));
            let tickets: Vec<_> = (0..REQUESTS)
                .map(|_| tracker.enter(&Limits::default()).unwrap())
                .collect();
            let barrier = Arc::new(std::sync::Barrier::new(REQUESTS + 1));
            let leaving: Vec<_> = tickets
                .into_iter()
                .map(|ticket| {
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        drop(ticket);
                    })
                })
                .collect();
            barrier.wait();
            let report = handle.drain(Duration::from_secs(20)).await;
            for thread in leaving {
                thread.join().unwrap();
            }
            assert!(
                report.waited() < Duration::from_secs(10),
                "round {round}: the drain waited for its deadline: {report:?}"
            );
            assert_eq!(handle.in_flight(), 0);
        }
    }
}
