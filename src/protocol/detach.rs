//! [`FinishOnDrop`]: once a key is claimed, the work runs to its end even if its caller goes
//! away.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

type Work<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A boxed piece of guarded work. Polled, it is the work; dropped before its end (the client
/// disconnected, a timeout fired, the consumer loop moved on), it is spawned onto the current
/// tokio runtime and finishes there, so its outcome is still stored or its claim released.
pub(crate) struct FinishOnDrop<T> {
    work: Option<Work<T>>,
    /// Spawns the rest; a function pointer so that `Drop` needs no `'static` bound on `T`.
    detach: fn(Work<T>),
}

impl<T: 'static> FinishOnDrop<T> {
    pub(crate) fn new(work: Work<T>) -> Self {
        Self {
            work: Some(work),
            detach: detach::<T>,
        }
    }
}

/// Spawns what is left of abandoned work, when a runtime is there to run it.
fn detach<T: 'static>(work: Work<T>) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            tracing::debug!(
                outcome = "detached",
                "caller went away; finishing the work in the background"
            );
            runtime.spawn(async move {
                let _ = work.await;
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
            (self.detach)(work);
        }
    }
}
