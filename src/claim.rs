//! The HTTP-agnostic protocol: claim a key, keep the lease alive while the work runs, then
//! complete it with a record or release it. The HTTP layer and the message-consumer adapter
//! both drive a [`Store`] through this module.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::{ClaimOutcome, OwnerToken, Record, Store, StoreError};

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
}

/// Why the protocol could not go on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store call timed out")]
    Timeout,
}

/// What [`begin`] found.
#[derive(Debug)]
pub(crate) enum Begin {
    /// The caller owns the key: run the work.
    Claimed(OwnerToken),
    /// The original still runs (after waiting, when waiting is on).
    InFlight { waited: bool },
    /// The original finished.
    Completed { record: Record, waited: bool },
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

/// Claims `key`; while it is in flight and waiting is on, waits for it (woken by the store,
/// never polling in a tight loop) until the wait bound.
pub(crate) async fn begin<St: Store>(
    store: &St,
    key: &str,
    timings: &Timings,
) -> Result<Begin, Failure> {
    let deadline = timings.wait.map(|wait| Instant::now() + wait);
    let mut attempt = 0u32;
    loop {
        let waited = attempt > 0;
        match bounded(timings.store_timeout, store.claim(key, timings.lease)).await? {
            ClaimOutcome::Claimed(token) => return Ok(Begin::Claimed(token)),
            ClaimOutcome::Completed(record) => return Ok(Begin::Completed { record, waited }),
            ClaimOutcome::InFlight { .. } => match deadline {
                Some(deadline) if Instant::now() < deadline => {
                    let _ = tokio::time::timeout_at(deadline, store.wait(key, attempt)).await;
                    attempt = attempt.saturating_add(1);
                }
                _ => return Ok(Begin::InFlight { waited }),
            },
        }
    }
}

/// Runs `work` while renewing the lease of `token` every third of the lease, so that only a
/// dead process lets a claim lapse. Renewal runs beside the work and never delays it.
pub(crate) async fn keep_alive<St: Store, F: Future>(
    store: &St,
    key: &str,
    token: &OwnerToken,
    timings: &Timings,
    work: F,
) -> F::Output {
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
                tick.as_mut().reset(Instant::now() + period);
            }
        }
    }
}

/// Stores `record` for `token`'s claim; failures are logged (the caller answers anyway).
pub(crate) async fn complete<St: Store>(
    store: &St,
    key: &str,
    token: &OwnerToken,
    record: Record,
    timings: &Timings,
) -> Result<(), Failure> {
    let result = bounded(
        timings.store_timeout,
        store.complete(key, token, record, timings.ttl),
    )
    .await;
    match &result {
        Ok(()) => tracing::debug!(outcome = "stored", "outcome stored"),
        Err(Failure::Store(StoreError::LeaseLost)) => {
            tracing::error!(
                outcome = "not_stored",
                reason = "lease_lost",
                "lease lost before completion; outcome not stored"
            )
        }
        Err(error) => {
            tracing::error!(outcome = "not_stored", reason = "store_error", %error, "outcome could not be stored")
        }
    }
    result
}

/// Releases `token`'s claim so the next attempt runs; failures are logged.
pub(crate) async fn release<St: Store>(
    store: &St,
    key: &str,
    token: &OwnerToken,
    timings: &Timings,
) {
    match bounded(timings.store_timeout, store.release(key, token)).await {
        Ok(()) => tracing::debug!("claim released"),
        Err(Failure::Store(StoreError::LeaseLost)) => {
            tracing::warn!("claim already lost when releasing it")
        }
        Err(error) => {
            tracing::warn!(%error, "claim could not be released; it lapses with its lease")
        }
    }
}

pin_project_lite::pin_project! {
    /// Turns a panic while polling `inner` into an `Err`.
    pub(crate) struct CatchUnwind<F> {
        #[pin]
        pub(crate) inner: F,
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        let output = ready!(
            match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
                Ok(poll) => poll.map(Ok),
                Err(panic) => Poll::Ready(Err(panic)),
            }
        );
        Poll::Ready(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn timings() -> Timings {
        Timings {
            lease: Duration::from_secs(3),
            ttl: Duration::from_secs(60),
            store_timeout: Duration::from_secs(1),
            wait: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_renews_the_lease_for_work_longer_than_the_lease() {
        let store = MemoryStore::new();
        let t = timings();
        let Begin::Claimed(token) = begin(&store, "k", &t).await.unwrap() else {
            panic!()
        };
        // Ten leases long: without renewal the claim would lapse after the first.
        keep_alive(&store, "k", &token, &t, tokio::time::sleep(t.lease * 10)).await;
        assert!(matches!(
            begin(&store, "k", &t).await.unwrap(),
            Begin::InFlight { .. }
        ));
        complete(&store, "k", &token, Record::new(None, "done"), &t)
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn without_keep_alive_the_lease_lapses_and_is_taken_over() {
        let store = MemoryStore::new();
        let t = timings();
        let Begin::Claimed(old) = begin(&store, "k", &t).await.unwrap() else {
            panic!()
        };
        tokio::time::sleep(t.lease + Duration::from_millis(1)).await;
        let Begin::Claimed(new) = begin(&store, "k", &t).await.unwrap() else {
            panic!("lapsed lease must be claimable")
        };
        assert_ne!(old, new);
        assert!(matches!(
            complete(&store, "k", &old, Record::new(None, "late"), &t).await,
            Err(Failure::Store(StoreError::LeaseLost))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_duplicate_gets_the_outcome_when_the_original_completes() {
        let store = MemoryStore::new();
        let mut t = timings();
        let Begin::Claimed(token) = begin(&store, "k", &t).await.unwrap() else {
            panic!()
        };
        t.wait = Some(Duration::from_secs(30));
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { begin(&store, "k", &t).await }
        });
        // Within the 3 s lease: the waiter is still waiting on the original.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!waiter.is_finished());
        complete(&store, "k", &token, Record::new(None, "done"), &t)
            .await
            .unwrap();
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
        let Begin::Claimed(_) = begin(&store, "k", &t).await.unwrap() else {
            panic!()
        };
        t.wait = Some(Duration::from_secs(2));
        let started = Instant::now();
        assert!(matches!(
            begin(&store, "k", &t).await.unwrap(),
            Begin::InFlight { waited: true }
        ));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
            "{waited:?}"
        );
    }
}
