//! [`FinishOnDrop`]: once a key is claimed, the work runs to its end even if its caller goes
//! away.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::drain::{Detached, Tracker};

type Work<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A boxed piece of guarded work. Polled, it is the work; dropped before its end (the client
/// disconnected, a timeout fired, the consumer loop moved on), it is spawned onto the current
/// tokio runtime and finishes there, so its outcome is still stored or its claim released.
pub(crate) struct FinishOnDrop<T> {
    work: Option<Work<T>>,
    /// Counts the work while it runs detached: the layer's tracker and the request bytes.
    tracker: Arc<Tracker>,
    bytes: u64,
    /// Spawns the rest; a function pointer so that `Drop` needs no `'static` bound on `T`.
    detach: fn(Work<T>, Detached),
}

impl<T: 'static> FinishOnDrop<T> {
    /// Work that, once detached, counts against `tracker`'s limits with `bytes` (the request
    /// body it declared, where known).
    pub(crate) fn new(work: Work<T>, tracker: Arc<Tracker>, bytes: u64) -> Self {
        Self {
            work: Some(work),
            tracker,
            bytes,
            detach: detach::<T>,
        }
    }
}

/// Spawns what is left of abandoned work, when a runtime is there to run it.
fn detach<T: 'static>(work: Work<T>, counted: Detached) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            tracing::debug!(
                outcome = "detached",
                "caller went away; finishing the work in the background"
            );
            runtime.spawn(async move {
                let _ = work.await;
                drop(counted);
            });
        }
        // Dropping the work drops its claim guard, which says what became of the claim.
        Err(_) => drop(work),
    }
}

impl<T> Future for FinishOnDrop<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let work = self
            .work
            .as_mut()
            .expect("FinishOnDrop polled after completion");
        let output = std::task::ready!(work.as_mut().poll(cx));
        self.work = None;
        Poll::Ready(output)
    }
}

impl<T> Drop for FinishOnDrop<T> {
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            let counted = self.tracker.detach(self.bytes);
            (self.detach)(work, counted);
        }
    }
}
