//! Wake-ups for duplicates that wait on another process: the shared stores publish every
//! completion and release (Redis pub/sub, PostgreSQL `NOTIFY`), one listener per store handle
//! receives them, and [`Wakers`] hands each to the local waiters of that key.
//!
//! Delivery is never needed for correctness: a waiter also wakes after a bounded time and
//! claims again, so a missed notification (a reconnect, a listener that is down) costs at most
//! that bound. While the listener is down, waiters back off with jitter as without it.

#![cfg_attr(
    not(any(feature = "redis", feature = "postgres")),
    allow(
        dead_code,
        reason = "the listener side serves Redis and PostgreSQL; SQLite wakes locally"
    )
)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;

use super::backoff_with_jitter;

/// How long a waiter sleeps when the listener is up and nothing arrives: the cost of one
/// missed notification.
const LISTENING_BOUND: Duration = Duration::from_secs(2);

/// The local waiters of one store handle (and its clones), by key.
#[derive(Default)]
pub(crate) struct Wakers {
    waiters: Mutex<HashMap<String, watch::Sender<()>>>,
    /// Whether the listener is subscribed now.
    listening: AtomicBool,
}

impl Wakers {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<()>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every local waiter of `key` (the payload of a notification).
    pub(crate) fn wake(&self, key: &str) {
        if let Some(sender) = self.map().remove(key) {
            let _ = sender.send(());
        }
    }

    pub(crate) fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::SeqCst);
    }

    pub(crate) fn is_listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// Waits until `key` is notified, or the bound for `attempt` passes.
    pub(crate) async fn wait(&self, key: &str, attempt: u32) {
        if !self.is_listening() {
            tokio::time::sleep(backoff_with_jitter(attempt, super::POLL)).await;
            return;
        }
        self.wait_subscribed(self.subscribe(key)).await;
    }

    /// Waits until `key` is notified, or `bound` passes.
    pub(crate) async fn wait_at_most(&self, key: &str, bound: Duration) {
        let _ = tokio::time::timeout(bound, self.subscribe(key).changed()).await;
    }

    /// Registers a local waiter of `key`: a wake-up of `key` from now on reaches it (a store
    /// that tells other processes of its waiter does so after this).
    pub(crate) fn subscribe(&self, key: &str) -> watch::Receiver<()> {
        let mut map = self.map();
        if map.len() >= 1024 {
            // Waiters that timed out leave their entry behind: drop the unwatched ones.
            map.retain(|_, sender| sender.receiver_count() > 0);
        }
        map.entry(key.to_owned())
            .or_insert_with(|| watch::channel(()).0)
            .subscribe()
    }

    /// Waits until the key of `receiver` is notified, or the listening bound passes (the
    /// cost of one missed notification).
    pub(crate) async fn wait_subscribed(&self, mut receiver: watch::Receiver<()>) {
        let bound = LISTENING_BOUND + Duration::from_millis(fastrand::u64(0..250));
        let _ = tokio::time::timeout(bound, receiver.changed()).await;
    }
}

/// The wake-up side of a shared store's handle (and its clones): its waiters, and whether its
/// listener was started.
#[derive(Default)]
pub(crate) struct Wake {
    pub(crate) wakers: Wakers,
    started: AtomicBool,
}

/// What a listener session holds: the handle's wake-up side, while the store lives.
#[derive(Clone)]
pub(crate) struct Listener(Weak<Wake>);

impl Listener {
    /// Wakes the local waiters of `key`; `false` once the store is gone (stop listening).
    pub(crate) fn wake(&self, key: &str) -> bool {
        self.0.upgrade().map(|wake| wake.wakers.wake(key)).is_some()
    }

    /// The session is subscribed: waiters may rely on notifications; `false` once the store
    /// is gone.
    pub(crate) fn subscribed(&self) -> bool {
        self.0
            .upgrade()
            .map(|wake| wake.wakers.set_listening(true))
            .is_some()
    }
}

impl Wake {
    /// Starts the listener of this handle, once: `session` connects, subscribes (then calls
    /// [`Listener::subscribed`]), and forwards notifications until its connection drops; it is
    /// run again after a pause, for as long as the store lives. While no session is
    /// subscribed, waiters back off.
    pub(crate) fn start<S, Fut>(self: &Arc<Self>, what: &'static str, mut session: S)
    where
        S: FnMut(Listener) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.started.store(false, Ordering::SeqCst);
            return;
        };
        let wake = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                session(Listener(wake.clone())).await;
                let Some(alive) = wake.upgrade() else { return };
                alive.wakers.set_listening(false);
                drop(alive);
                tracing::debug!(
                    "{what} disconnected; waiting duplicates back off until it is back"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
}
