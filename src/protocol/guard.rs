//! [`ClaimGuard`]: a held claim, from the claim to its completion or release.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use std::sync::Arc;

use super::{bounded, ready_now, Failure, RecoveryPoints, RequestFingerprint, Ticket, Timings};
use crate::store::{OwnerToken, Record, Store, StoreError};

/// A claim this process holds on a key: the store, the key, the owner token and the timings,
/// in one value. Every adapter runs its work through [`run`](Self::run) and ends the claim
/// with [`complete`](Self::complete) or [`release`](Self::release); a guard dropped without
/// either releases the claim in the background, so a key is never left blocked for a lease.
pub(crate) struct ClaimGuard<St: Store> {
    held: Option<Held<St>>,
}

struct Held<St> {
    store: St,
    key: Arc<str>,
    token: OwnerToken,
    timings: Timings,
    /// Counts this claim for a drain until the claim has ended.
    _ticket: Ticket,
}

/// The work panicked; the payload, to log or re-raise.
pub(crate) struct Panicked(pub(crate) Box<dyn Any + Send>);

impl Panicked {
    /// The panic message, when it is a string.
    pub(crate) fn message(&self) -> &str {
        if let Some(message) = self.0.downcast_ref::<&'static str>() {
            message
        } else if let Some(message) = self.0.downcast_ref::<String>() {
            message
        } else {
            "a panic with a non-string payload"
        }
    }
}

impl Panicked {
    /// Logs the panic (done by [`catch_unwind`], where it is caught).
    fn report(&self) {
        tracing::error!(
            outcome = "not_stored",
            reason = "panic",
            panic = self.message(),
            "handler panicked; releasing the key"
        );
    }
}

impl fmt::Debug for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Panicked").field(&self.message()).finish()
    }
}

impl<St: Store> ClaimGuard<St> {
    pub(crate) fn new(
        store: St,
        key: Arc<str>,
        token: OwnerToken,
        timings: Timings,
        ticket: Ticket,
    ) -> Self {
        Self {
            held: Some(Held {
                store,
                key,
                token,
                timings,
                _ticket: ticket,
            }),
        }
    }

    fn held(&self) -> &Held<St> {
        self.held
            .as_ref()
            .expect("a claim guard is held until it is consumed")
    }

    /// The store key this guard holds.
    pub(crate) fn key(&self) -> &str {
        &self.held().key
    }

    /// The owner token of this claim.
    pub(crate) fn token(&self) -> OwnerToken {
        self.held().token
    }

    /// The store this claim is held in, and the longest a call to it may take: for the calls a
    /// streaming original makes beside the claim's own (its live stream's appends).
    pub(crate) fn store(&self) -> (&St, Duration) {
        let held = self.held();
        (&held.store, held.timings.store_timeout)
    }

    /// The recovery points of this claim, for the work it runs: kept for `ttl`, each at most
    /// `max_bytes`, bound to the fingerprint of the `request` the work serves.
    pub(crate) fn recovery_points(
        &self,
        ttl: Duration,
        max_bytes: usize,
        request: RequestFingerprint,
    ) -> RecoveryPoints
    where
        St: Clone,
    {
        let held = self.held();
        // A point outlives the lease that lets a crashed run's retry in, whatever the TTL.
        let ttl = ttl.max(held.timings.lease.saturating_mul(2));
        let limits = super::recovery::PointLimits {
            ttl,
            max_bytes,
            timeout: held.timings.store_timeout,
        };
        RecoveryPoints::new(
            held.store.clone(),
            held.key.clone(),
            held.token,
            limits,
            request,
            held._ticket.keep_on_drain(),
        )
    }

    /// Runs `work` while renewing the lease, catching a panic.
    pub(crate) async fn run<F: Future>(&self, work: F) -> Result<F::Output, Panicked> {
        self.keep_alive(catch_unwind(work)).await
    }

    /// Runs `work` while renewing the lease every third of it, so that only a dead process
    /// lets a claim lapse. Renewal runs beside the work and never delays it.
    pub(crate) async fn keep_alive<F: Future>(&self, work: F) -> F::Output {
        let Held {
            store,
            key,
            token,
            timings,
            ..
        } = self.held();
        let period = timings.lease / 3;
        let mut work = std::pin::pin!(work);
        // Work that is done at once needs no renewal timer.
        if let Some(out) = ready_now(&mut work).await {
            return out;
        }
        let tick = tokio::time::sleep(period);
        let mut tick = std::pin::pin!(tick);
        let mut renewing = true;
        loop {
            tokio::select! {
                biased;
                out = &mut work => return out,
                () = &mut tick, if renewing => {
                    let renewal = bounded(timings.store_timeout, store.renew(key, token, timings.lease));
                    tokio::select! {
                        biased;
                        out = &mut work => return out,
                        result = renewal => match result {
                            Ok(()) => tracing::trace!("lease renewed"),
                            Err(Failure::Store(StoreError::LeaseLost)) => {
                                tracing::warn!("lease lost while the handler was running; its outcome will not be stored");
                                renewing = false;
                            }
                            Err(error) => tracing::warn!(%error, "lease renewal failed; retrying at the next tick"),
                        },
                    }
                    tick.as_mut().reset(super::later(Instant::now(), period));
                }
            }
        }
    }

    /// Replaces the claim by `record`, kept for the TTL. See [`complete_for`](Self::complete_for).
    #[cfg_attr(not(feature = "consumer"), allow(dead_code))]
    pub(crate) async fn complete(self, record: Record) -> Completion {
        let ttl = self.held().timings.ttl;
        self.complete_for(record, ttl).await
    }

    /// Replaces the claim by `record`, kept for `ttl` (clamped to what the layer accepts).
    ///
    /// An outcome, once produced, must not be lost to a store blip: when the call fails for a
    /// transient reason (the store is down, restarting, slower than the store timeout), the
    /// claim is kept and the completion retried in the background, renewing the lease, until
    /// it succeeds, the store says the lease is lost, or a whole lease passes without any
    /// contact with the store. Duplicates meanwhile get 409 (or wait), never a second run.
    /// The caller answers without waiting for the retries.
    ///
    /// This and the releases are functions returning `async` blocks, not `async fn`s: an
    /// `async fn` keeps its arguments (the guard, the record) twice, in every fresh key's state.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn complete_for(
        mut self,
        record: Record,
        ttl: Duration,
    ) -> impl Future<Output = Completion> {
        async move {
            let ttl = ttl.clamp(Duration::from_millis(1), super::MAX_DURATION);
            // The guard keeps the claim until the call returns: should it panic, the drop releases.
            let held = self.held();
            let result = bounded(
                held.timings.store_timeout,
                held.store
                    .complete(&held.key, &held.token, record.clone(), ttl),
            )
            .await;
            let held = self.held.take().expect("held until consumed");
            match result {
                Ok(()) => {
                    tracing::debug!(outcome = "stored", "outcome stored");
                    Completion::Stored
                }
                Err(Failure::Store(StoreError::LeaseLost)) => {
                    tracing::error!(
                        outcome = "not_stored",
                        reason = "lease_lost",
                        "lease lost before completion; outcome not stored"
                    );
                    Completion::Failed
                }
                Err(error) => held.retry_in_background(Pending::Complete(record, ttl), &error),
            }
        }
    }

    /// Releases the claim so the next attempt runs. A transient failure is retried in the
    /// background (a released key must not stay blocked for a lease because one call failed).
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn release(mut self) -> impl Future<Output = ()> {
        // Taken on the first poll, not now: a release dropped unpolled leaves the guard to
        // release the claim from its drop.
        async move {
            let held = self.held.take().expect("held until consumed");
            held.release().await;
        }
    }
}

/// What became of [`ClaimGuard::complete_for`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// The record is stored.
    Stored,
    /// The store failed for a transient reason; the completion is being retried.
    Retrying,
    /// The outcome will not be stored (lease lost, or no room to retry): the claim lapses.
    Failed,
}

impl From<Completion> for super::Outcome {
    fn from(completion: Completion) -> Self {
        match completion {
            Completion::Stored => super::Outcome::Stored,
            Completion::Retrying => super::Outcome::StoreRetrying,
            Completion::Failed => super::Outcome::NotStored,
        }
    }
}

/// A store call to retry in the background.
enum Pending {
    Complete(Record, Duration),
    Release,
}

impl Pending {
    fn bytes(&self) -> u64 {
        match self {
            Pending::Complete(record, _) => record.payload_len() as u64,
            Pending::Release => 0,
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Pending::Complete(..) => "completion",
            Pending::Release => "release",
        }
    }
}

/// Backoff between retries of a pending call.
pub(super) fn retry_backoff(attempt: u32) -> Duration {
    crate::store::backoff_with_jitter(attempt, crate::store::RETRY)
}

impl<St: Store> Held<St> {
    #[allow(clippy::manual_async_fn)]
    fn release(self) -> impl Future<Output = ()> {
        async move {
            match bounded(
                self.timings.store_timeout,
                self.store.release(&self.key, &self.token),
            )
            .await
            {
                Ok(()) => tracing::debug!("claim released"),
                Err(Failure::Store(StoreError::LeaseLost)) => {
                    tracing::warn!("claim already lost when releasing it")
                }
                Err(error) => {
                    let _ = self.retry_in_background(Pending::Release, &error);
                }
            }
        }
    }

    /// Hands `pending` to a background task, within the layer's bound on pending bytes.
    fn retry_in_background(self, pending: Pending, error: &Failure) -> Completion {
        let what = pending.what();
        let Some(reserved) = self._ticket.reserve_pending(pending.bytes()) else {
            tracing::error!(outcome = "not_stored", reason = "store_error", %error,
                "{what} failed and too many are already being retried; the claim lapses with its lease");
            return Completion::Failed;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(outcome = "not_stored", reason = "store_error", %error,
                "{what} failed outside a tokio runtime; the claim lapses with its lease");
            return Completion::Failed;
        };
        tracing::warn!(outcome = "store_retrying", %error, "{what} failed; retrying in the background, keeping the claim");
        runtime.spawn(async move {
            self.retry(pending).await;
            drop(reserved);
        });
        Completion::Retrying
    }

    async fn retry(self, pending: Pending) {
        let lease = self.timings.lease;
        let mut give_up = super::later(Instant::now(), lease);
        let mut attempt = 0u32;
        loop {
            tokio::time::sleep(retry_backoff(attempt)).await;
            attempt = attempt.saturating_add(1);
            let timeout = self.timings.store_timeout;
            let result = match &pending {
                Pending::Complete(record, ttl) => {
                    let call = self
                        .store
                        .complete(&self.key, &self.token, record.clone(), *ttl);
                    bounded(timeout, call).await
                }
                Pending::Release => {
                    bounded(timeout, self.store.release(&self.key, &self.token)).await
                }
            };
            let what = pending.what();
            match result {
                Ok(()) => {
                    tracing::info!(
                        outcome = "stored_late",
                        attempts = attempt,
                        "{what} succeeded after retrying"
                    );
                    return;
                }
                Err(Failure::Store(StoreError::LeaseLost)) => {
                    tracing::error!(outcome = "not_stored", reason = "lease_lost", attempts = attempt,
                        "{what} retried, but the store no longer holds the claim (it restarted without it, or the lease lapsed)");
                    return;
                }
                Err(error) if Instant::now() >= give_up => {
                    tracing::error!(outcome = "not_stored", reason = "store_error", %error, attempts = attempt,
                        "{what} still failing after a whole lease without contact; giving up");
                    return;
                }
                Err(_) => {
                    if let Pending::Complete(..) = pending {
                        let renewal = self.store.renew(&self.key, &self.token, lease);
                        if bounded(timeout, renewal).await.is_ok() {
                            give_up = super::later(Instant::now(), lease);
                        }
                    }
                }
            }
        }
    }
}

impl<St: Store> Drop for ClaimGuard<St> {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                tracing::warn!(
                    outcome = "released",
                    reason = "guard_dropped",
                    "claim dropped before its outcome; releasing it in the background"
                );
                runtime.spawn(held.release());
            }
            Err(_) => tracing::error!(
                outcome = "abandoned",
                "claim dropped outside a tokio runtime; it lapses with its lease"
            ),
        }
    }
}

impl<St: Store> fmt::Debug for ClaimGuard<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("ClaimGuard");
        if let Some(held) = &self.held {
            debug.field("key", &held.key).field("token", &held.token);
        }
        debug.finish_non_exhaustive()
    }
}

/// Runs `future`, turning a panic while polling it into [`Panicked`]: the adapters wrap their
/// own code in it too, so that a bug in the layer answers an error (and drops the claim guard,
/// which releases the key) instead of unwinding into the server.
/// The panic is logged here, once, for every adapter.
pub(crate) fn catch_unwind<F: Future>(future: F) -> CatchUnwind<F> {
    CatchUnwind { inner: future }
}

pin_project_lite::pin_project! {
    /// Turns a panic while polling `inner` into [`Panicked`], logged (see [`catch_unwind`]).
    pub(crate) struct CatchUnwind<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Panicked>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        let output = ready!(
            match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
                Ok(poll) => poll.map(Ok),
                Err(panic) => Poll::Ready(Err(panic)),
            }
        );
        Poll::Ready(output.map_err(|panic| {
            let panic = Panicked(panic);
            panic.report();
            panic
        }))
    }
}
