//! [`ResponseFuture`]: passes through, answers at once, or drives a guarded request, which it
//! detaches onto the runtime should the caller drop it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;

use super::response_body::ResponseBody;
use std::sync::Arc;

use crate::protocol::{FinishOnDrop, Tracker};

type KeyedWork<B, E> = Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, E>> + Send>>;

pin_project_lite::pin_project! {
    /// Response future of [`Idempotency`](crate::Idempotency).
    ///
    /// Once a request holds its key, dropping this future (the client disconnected, a timeout
    /// fired) does **not** cancel it: the rest of the work (the handler, storing its response
    /// or releasing the key) is spawned onto the current tokio runtime and runs to its end, so
    /// that a retry replays the outcome instead of running the handler a second time.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Passthrough { #[pin] future: F },
        Ready { response: Option<Response<ResponseBody<B>>> },
        Keyed { work: FinishOnDrop<Result<Response<ResponseBody<B>>, E>> },
        // A replay answered from a record the store gave at once: it holds no key, so when
        // it is dropped unfinished there is nothing to finish.
        Replay { work: KeyedWork<B, E> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(future: F) -> Self {
        Self {
            kind: Kind::Passthrough { future },
        }
    }

    pub(crate) fn ready(response: Response<ResponseBody<B>>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    /// A replay that holds no key: dropped unfinished, it is dropped (nothing to finish).
    pub(crate) fn replay(work: KeyedWork<B, E>) -> Self {
        Self {
            kind: Kind::Replay { work },
        }
    }

    pub(crate) fn keyed(work: KeyedWork<B, E>, tracker: Arc<Tracker>, bytes: u64) -> Self
    where
        B: 'static,
        E: 'static,
    {
        Self {
            kind: Kind::Keyed {
                work: FinishOnDrop::new(work, tracker, bytes),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            KindProj::Ready { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Keyed { work } => Pin::new(work).poll(cx),
            KindProj::Replay { work } => work.as_mut().poll(cx),
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
